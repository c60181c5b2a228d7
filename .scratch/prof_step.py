import json, os, sys, time, statistics
sys.path.insert(0, "benchmarks")
import step_bench as sb
import torch
from moe_lora_plugins.testing.distributed import init_single_process_group
from moe_lora_plugins.testing.tiny_models import LoraSettings
from moe_lora_plugins.demo import cpu_training
init_single_process_group()
config = sb.issue_config(8, 128)
models = {"attention": sb._build(config, LoraSettings(dim=16, alpha=32, target_modules=sb.ATTENTION))}
cpu_training.install()
models["experts"] = sb._build(config, LoraSettings(dim=16, alpha=32, target_modules=sb.EVERY_LINEAR))
inputs = sb._Inputs(4, 2048, config.vocab_size)
cases = {"lora_attention": "attention", "lora_experts_grouped": "experts"}
res = {}
for _ in range(2):
    for mode, m in cases.items():
        sb._enter(mode); sb._step(models[m], inputs, backward=True); sb._sync()
for mode, m in cases.items():
    walls, cpus = [], []
    for _ in range(4):
        sb._enter(mode); sb._sync(); t = time.perf_counter(); c = time.process_time()
        sb._step(models[m], inputs, backward=True); sb._sync()
        walls.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
    # forward only timing with CPU
    fw, fc = [], []
    for _ in range(3):
        sb._enter(mode); sb._sync(); t = time.perf_counter(); c = time.process_time()
        sb._step(models[m], inputs, backward=False); sb._sync()
        fw.append(time.perf_counter() - t); fc.append(time.process_time() - c)
    from torch.profiler import profile, ProfilerActivity
    sb._enter(mode)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sb._step(models[m], inputs, backward=True); sb._sync()
    ka = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in ka) / 1e6
    res[mode] = {"wall_med": statistics.median(walls), "cpu_med": statistics.median(cpus),
                 "fwd_wall_med": statistics.median(fw), "fwd_cpu_med": statistics.median(fc),
                 "gpu_kernel_s": gpu_total,
                 "by_gpu": ka.table(sort_by="self_device_time_total", row_limit=25),
                 "by_cpu": ka.table(sort_by="self_cpu_time_total", row_limit=40),
                 "counts": ka.table(sort_by="count", row_limit=30)}
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof.json"), "w"), indent=1)
for mode, r in res.items():
    print(mode, {k: v for k, v in r.items() if not isinstance(v, str)})
