"""`python -m xray bench` at tiny sizes: the report's structure, not its speed."""
from __future__ import annotations

import json

import pytest

from conftest import DATASET, FULLRES
from xray.cli import main


def _numbers_positive(d: dict, keys: list[str]) -> None:
    for key in keys:
        assert isinstance(d[key], float) and d[key] > 0, (key, d[key])


@pytest.mark.slow
def test_bench_reports_every_section(tiny_registry, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--train-data", str(DATASET), "--train-steps", "1", "--train-epochs", "2",
                 "--images", str(DATASET), str(FULLRES), "--n-images", "3", "--batch", "2", "--repeats", "1",
                 "--matmul-size", "64", "--threads", "1", "--workers", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "matmul" in printed and "end to end" in printed and "training" in printed

    assert result["matmul_gflops"] > 0
    model = result["model"]
    assert "untrained" not in model["which"]  # the registry's active tiny model was used
    assert model["image_size"] == 64 and model["flops_per_image"] == 2 * model["macs_per_image"] > 0

    forward = result["forward"]
    _numbers_positive(forward, ["ours_contiguous", "ours_channels_last", "ours_channels_last_bn_folded",
                                "reference_contiguous", "reference_channels_last"])
    assert 0 < forward["fraction_of_matmul_peak"]
    assert "mobilenet_v3_small" in forward["reference"] and "224x224" in forward["reference"]  # issue #15's reference

    assert [e["folder"] for e in result["end_to_end"]] == [str(DATASET), str(FULLRES)]
    for e2e in result["end_to_end"]:
        for name in ("decode_only", "decode_and_resize_all_cores", "batch_1", "batch_32", "batch_1_gradcam",
                     "cli_streaming_batch_32"):
            assert e2e[name]["images_per_s"] > 0 and e2e[name]["peak_rss_mib"] > 0
        assert e2e["cli_streaming_batch_32"]["decode_processes"] == 1
        assert e2e["batch_32_vs_reference_forward"] > 0 and e2e["cli_streaming_batch_32_vs_reference_forward"] > 0

    training = result["training"]
    assert training["decode_cold"]["images"] == 16 and training["decode_cached_seconds"] >= 0
    assert [row["epoch"] for row in training["epochs"]] == [1, 2]
    assert all(row["seconds_per_epoch_estimate"] > 0 for row in training["epochs"])
    assert training["batch_size"] == 64 and training["image_size"] == 128  # the shipped settings


def test_bench_skips_training_cleanly_without_data(tiny_registry, tmp_path, capsys):
    assert main(["bench", "--train-data", str(tmp_path / "absent"), "--images", str(tmp_path / "empty"),
                 "--repeats", "1", "--matmul-size", "64", "--batch", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "training: skipped (no folder" in printed and "end to end: skipped" in printed
