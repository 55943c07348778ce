"""One process = one round: build the engine of the tree on PYTHONPATH, warm up, run atv and off (32 x 64 tokens,
greedy, EOS ignored) and print one JSON line. Alternated old/new by the driver (uniform_ab.sh), same prompts.
Prefix caching, where the tree has it, is off: the old engine had none and the prompts share no block."""
import json
import os
import sys

from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig
from atv_core.tools import bench

try:
    from atv_core.tools.tasks import workload_prompts
except ImportError:                                  # trees before the server-seam move
    from atv_core.tools.bench import workload_prompts

label = sys.argv[1]
extra = {"max_num_batched_tokens": int(os.environ["BUDGET"])} if os.environ.get("BUDGET") else {}
if "enable_prefix_caching" in EngineConfig.__dataclass_fields__:
    extra["enable_prefix_caching"] = False
engine = build_engine("embedded:smollm2-135m-instruct", "default", device="cpu", dtype="float32",
                      config=EngineConfig(max_running=32, **extra))
prompts = workload_prompts(32)
bench.run_engine(engine, prompts[:4], "atv", 4)
out = {"tree": label}
for mode in ("atv", "off"):
    out[mode] = bench.run_engine(engine, prompts, mode, 64)["tok_per_s"]
print("RESULT " + json.dumps(out), flush=True)
