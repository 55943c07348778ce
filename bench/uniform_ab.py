"""One process = one round: build the engine of the tree on PYTHONPATH, warm up, run atv and off (32 x 64 tokens,
greedy, EOS ignored) and print one JSON line. Alternated old/new by the driver, same prompts."""
import json, sys, time
from atv_core.tools import bench
from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig
try:
    from atv_core.tools.tasks import workload_prompts
except ImportError:
    from atv_core.tools.bench import workload_prompts
label = sys.argv[1]
import os
extra = {"max_num_batched_tokens": int(os.environ["BUDGET"])} if os.environ.get("BUDGET") else {}
engine = build_engine("embedded:smollm2-135m-instruct", "default", device="cpu", dtype="float32",
                      config=EngineConfig(max_running=32, **extra))
prompts = workload_prompts(32)
bench.run_engine(engine, prompts[:4], "atv", 4)
out = {"tree": label}
for mode in ("atv", "off"):
    r = bench.run_engine(engine, prompts, mode, 64)
    out[mode] = r["tok_per_s"]
print("RESULT " + json.dumps(out), flush=True)
