"""`atv bench prefix` runs end to end on a tiny model (a functional smoke run; no timing is judged)."""
import json

import pytest

from atv_core.cli import main
from tests.tiny import make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_prefix_reuses_the_system_prompt_and_outputs_match(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "report.json"
    assert main(["bench", "prefix", "--model", str(model), "--generator", "none", "--device", "cpu",
                 "--dtype", "float32", "--requests", "4", "--system-tokens", "300", "--new-tokens", "2",
                 "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["outputs_equal"] and report["no_reuse"]["prefix_cache_hits"] == 0
    assert report["reuse"]["prefix_cache_hits"] >= 288   # > 256 tokens: chunked, so later requests find its 18 blocks
