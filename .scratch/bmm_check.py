import json, torch
torch.manual_seed(0)
dev = "cuda"
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "tf32": torch.backends.cuda.matmul.allow_tf32}
shapes = {"gate": (768, 2048), "down": (2048, 768), "qkv": (6144, 2048)}
E, r, scale = 64, 16, 2.0
for name, (o, i) in shapes.items():
    base = torch.randn(E, o, i, device=dev, dtype=torch.bfloat16)
    A = (torch.randn(E, r, i, device=dev) * 0.02).to(torch.bfloat16)
    B = (torch.randn(E, o, r, device=dev) * 0.02).to(torch.bfloat16)
    ref = []
    for e in range(E):
        lo = B[e].to(torch.float32); li = A[e].to(torch.float32)
        ref.append((base[e].float() + scale * (lo @ li)).to(torch.bfloat16))
    ref = torch.stack(ref)
    out = {}
    d = scale * torch.bmm(B.float(), A.float())
    out["bmm_then_add"] = torch.equal(torch.stack([(base[e].float() + d[e]).to(torch.bfloat16) for e in range(E)]), ref)
    out["bmm_add_batched"] = torch.equal((base.float() + d).to(torch.bfloat16), ref)
    out["bmm_torch_add_promote"] = torch.equal(torch.add(base, d).to(torch.bfloat16), ref)
    d2 = torch.matmul(B.float(), A.float()) * scale
    out["matmul_batched"] = torch.equal((base.float() + d2).to(torch.bfloat16), ref)
    d3 = torch.baddbmm(base.float(), B.float(), A.float(), alpha=scale)
    out["baddbmm"] = torch.equal(d3.to(torch.bfloat16), ref)
    # delta itself
    dref = torch.stack([scale * (B[e].float() @ A[e].float()) for e in range(E)])
    out["delta_equal"] = torch.equal(d, dref)
    res[name] = out
# timing
import time
o, i = 768, 2048
base = torch.randn(E, o, i, device=dev, dtype=torch.bfloat16); A = torch.randn(E, r, i, device=dev).bfloat16(); B = torch.randn(E, o, r, device=dev).bfloat16()
for mode in ("per", "batched"):
    ts = []
    for _ in range(6):
        torch.cuda.synchronize(); t = time.perf_counter()
        if mode == "per":
            outs = [(base[e].float() + scale * (B[e].float() @ A[e].float())).to(torch.bfloat16) for e in range(E)]
        else:
            d = scale * torch.bmm(B.float(), A.float()); outs = (base.float() + d).to(torch.bfloat16)
        torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    res[f"time_{mode}_64x768x2048"] = sorted(ts)[len(ts)//2]
print(json.dumps(res, indent=1))
