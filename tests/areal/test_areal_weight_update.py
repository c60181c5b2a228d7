"""AReaL's LoRA weight-update path carried by our adapter sync, into a real vLLM CPU engine.

The trainer is a separate process (``areal_trainer.py``) running AReaL 1.0.4's own rollout client,
``areal.engine.vllm_remote.RemotevLLMEngine``: ``init_weights_update_group`` and, inside
``moe_lora_plugins.integrations.areal.send_adapter_update``, ``update_weights_from_distributed``
(AReaL's request builder ``VLLMBackend.build_distributed_weight_update_requests`` and its HTTP
client), with the weight-update group made by AReaL's ``init_custom_process_group``. The engine is
an in-process ``vllm.LLM`` with ``AReaLMoeLoraWorkerExtension``; AReaL's group init on the worker is
AReaL's own ``areal_init_update_weight_group``.

Between them stands a relay for AReaL's server routes: AReaL 1.0.4's ``areal_vllm_server`` does not
import under vLLM 0.32 (it imports ``vllm.entrypoints.openai.cli_args``, which 0.32 no longer has). The
relay does what those routes do: each endpoint calls the worker method of the same route with the
payload's fields in the route's order, and answers 400 when a worker returned ``(False, message)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.vllm import conftest as helpers
from tests.vllm import tiny_models

pytestmark = pytest.mark.areal

TRAINER = os.path.join(os.path.dirname(__file__), "areal_trainer.py")

# AReaL's route -> (worker method, payload fields in the order the route passes them)
ROUTES = {
    "/areal_init_weights_update_group": ("areal_init_update_weight_group",
                                         ["master_address", "master_port", "rank_offset", "world_size", "backend",
                                          "group_name"]),
    "/areal_set_update_weight_meta_lora": ("areal_set_weight_meta_lora",
                                           ["names", "dtypes", "shapes", "group_name", "lora_name", "lora_int_id",
                                            "lora_target_modules", "lora_rank", "lora_alpha", "lora_bias",
                                            "base_model_name"]),
    "/areal_update_weights_lora_xccl": ("areal_update_weight_lora_xccl", []),
}


def serve_areal_routes(llm):
    lock = threading.Lock()
    answers = []  # (route, status, message) in order

    class Relay(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return None

        def do_POST(self):
            method, fields = ROUTES[self.path]
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            with lock:
                results = llm.collective_rpc(method, args=tuple(payload[k] for k in fields))
                if self.path == "/areal_update_weights_lora_xccl":
                    llm.reset_prefix_cache()  # AReaL's route pauses with clear_cache=True
            ok = all(r[0] for r in results)
            message = "\n".join(str(r[1]) for r in results)
            answers.append((self.path, 200 if ok else 400, message))
            body = json.dumps({"success": ok, "message": message}).encode()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    server.answers = answers
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


LORA_NAME, LORA_ID, DIRECT_ID = "areal-policy", 11, 12  # the lane shares one engine: ids of this module


@pytest.fixture(scope="module")
def engine(areal_engine):
    llm, model = areal_engine  # the lane's one engine (tests/areal/conftest.py)
    server = serve_areal_routes(llm)
    yield llm, model, f"127.0.0.1:{server.server_address[1]}", server.answers
    server.shutdown()
    for name in llm.collective_rpc("moelora_adapter_status")[0]:
        if name.startswith(LORA_NAME):
            llm.collective_rpc("moelora_remove_adapter", args=(name,))


def run_trainer(tmp_path, server, model, updates):
    from safetensors.torch import save_file

    entries = []
    for version, tensors in updates:
        path = str(tmp_path / f"adapter-v{version}.safetensors")
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, path)
        entries.append({"version": version, "adapter": path})
    job = {"server": server, "port": helpers.free_port(), "group": "areal-weight-update", "lora_name": LORA_NAME,
           "lora_int_id": LORA_ID, "base_model": model.path, "config": tiny_models.adapter_config(False),
           "timeout_s": 60, "updates": entries}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    out = subprocess.run([sys.executable, TRAINER, str(job_file)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([helpers.SRC, os.getcwd()])})
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(updates), out.stderr[-4000:]
    return lines


def test_areals_lora_update_carries_our_sync_and_a_failed_one_keeps_the_adapter(engine, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    llm, model, server, answers = engine
    good = tiny_models.make_adapter(False, seed=11)
    bad = dict(tiny_models.make_adapter(False, seed=12))
    dropped = sorted(k for k in bad if "lora_B" in k)[0]
    bad.pop(dropped)  # an incomplete adapter: refused by the worker's validation before any swap
    results = run_trainer(tmp_path, server, model, [(1, good), (2, bad)])

    assert results[0] == {"version": 1, "error": None}
    assert results[1]["error"] is not None and "Failed after 1 retries" in results[1]["error"], results  # AReaL's
    updates = [a for a in answers if a[0] == "/areal_update_weights_lora_xccl"]
    assert [a[1] for a in updates] == [200, 400]
    assert "moe-lora-plugins sync 1" in updates[0][2]
    assert f"moe-lora-plugins adapter sync into '{LORA_NAME}-v2'" in updates[1][2]
    assert dropped.split("base_model.model.")[-1] in updates[1][2], updates[1][2]
    status = {k: v for k, v in llm.collective_rpc("moelora_adapter_status")[0].items() if k.startswith(LORA_NAME)}
    served_name = f"{LORA_NAME}-v1"
    assert status == {served_name: {"lora_int_id": LORA_ID, "version": 1, "loaded": True,
                                    "wire_bytes": status[served_name]["wire_bytes"]}}

    peft_dir = tiny_models.save_peft_dir(str(tmp_path / "peft"), good, tiny_models.adapter_config(False))
    served = helpers.greedy(llm, lora_request(served_name, LORA_ID))
    direct = helpers.greedy(llm, LoRARequest(f"{LORA_NAME}-direct", DIRECT_ID, peft_dir))
    assert served.tokens == direct.tokens
    assert served.logprobs == direct.logprobs  # bitwise: Python floats from the same float32 values
    assert served.logprobs != helpers.greedy(llm).logprobs


def test_areals_own_lora_update_is_untouched_without_the_announcement(engine):
    """Any other announcement reaches AReaL's own method: here it refuses an id the engine never loaded,
    in AReaL's own words."""
    llm = engine[0]
    meta = ([["model.layers.0.self_attn.q_proj.lora_A.weight"], ["float32"], [[4, 64]], "no-such-group", "other", 7,
             ["q_proj"], 4, 8, "none", "tiny"])
    assert [tuple(r) for r in llm.collective_rpc("areal_set_weight_meta_lora", args=meta)] == [(True, "Success")]
    with pytest.raises(KeyError, match="Weight update group named `no-such-group` not found"):
        llm.collective_rpc("areal_update_weight_lora_xccl")


@pytest.mark.parametrize(("meta_kwargs", "named"), [
    ({"type": "disk", "use_lora": True, "version": 1}, "type='disk'"),
    ({"type": "xccl", "use_lora": False, "version": 1}, "use_lora=False"),
    ({"type": "xccl", "use_lora": True, "version": None}, "version is None"),
    ({"type": "xccl", "use_lora": True, "version": 1, "gen_allocation": "vllm:d1p2"}, "pp_size=2"),
])
def test_send_adapter_update_refuses_what_it_cannot_carry_before_sending(engine, meta_kwargs, named):
    """Refused before AReaL's client or the group are touched (both are None here)."""
    from areal.api import WeightUpdateMeta
    from areal.api.alloc_mode import ModelAllocation

    from moe_lora_plugins.integrations.areal import send_adapter_update

    kwargs = dict(meta_kwargs)
    if "gen_allocation" in kwargs:
        kwargs["gen_allocation"] = ModelAllocation.from_str(kwargs["gen_allocation"])
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        send_adapter_update(None, None, WeightUpdateMeta(**kwargs), {}, config=tiny_models.adapter_config(False))
