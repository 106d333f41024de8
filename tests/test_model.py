"""The network's two stems, the prepared-input path of predict, and the CLI pipeline's core split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DATASET, FULLRES
from xray.serve.pipeline import iter_shard, cpu_allocation, score_paths
from xray.io.loader import load_image
from xray.serve.inference import predict
from xray.io.preprocess import ModelInput, model_input, read_model_input
from xray.model.net import ModelConfig, PneumoniaNet, count_macs, stage_strides
from xray.train.config import TrainConfig, model_config


def test_strides_bring_the_last_stages_to_a_sixteenth_of_the_input():
    assert stage_strides("conv", 4) == (2, 2, 2, 1)  # the first shipped architecture
    assert stage_strides("patch4", 3) == (2, 2, 1)
    assert stage_strides("patch4", 4) == (2, 2, 1, 1)
    for stem, stages in (("conv", 4), ("patch4", 3), ("patch4", 4)):
        net = PneumoniaNet(ModelConfig(widths=(16, 32, 64, 64)[:stages], strides=stage_strides(stem, stages),
                                       stem=stem)).eval()
        with torch.inference_mode():
            grid = net.stages(net.stem(torch.zeros(1, 1, 128, 128)))
        assert grid.shape[-2:] == (8, 8), (stem, stages)  # Grad-CAM's grid is the same for every stem


def test_the_default_patch_stem_costs_a_quarter_of_the_conv_stem_net():
    default = PneumoniaNet(model_config(TrainConfig()).member)
    first = PneumoniaNet(ModelConfig())  # conv stem, widths 32-256: a card without "stem" builds this
    assert default.config.stem == "patch4" and first.config.stem == "conv"
    assert count_macs(default, 128) * 4 < count_macs(first, 128)
    # the patch convolution sees each pixel once: 4x4 non-overlapping patches, no padding
    conv = default.stem[0]
    assert conv.kernel_size == conv.stride == (4, 4) and conv.padding == (0, 0)
    with pytest.raises(ValueError, match="unknown stem"):
        PneumoniaNet(ModelConfig(stem="patch3"))


def test_cards_written_before_the_stem_existed_still_load():
    config = ModelConfig.from_dict({"widths": [8, 16, 32, 64], "strides": [2, 2, 2, 1], "dropout": 0.3,
                                    "normalisation": "standardise"})
    assert config.stem == "conv"
    PneumoniaNet(config)(torch.zeros(2, 1, 64, 64))


def test_a_prepared_input_scores_exactly_like_the_decoded_image(tiny_model):
    paths = sorted(DATASET.rglob("*.jpeg"))[:3] + sorted(FULLRES.rglob("*.jpeg"))[:1]
    prepared = [read_model_input(p, tiny_model.image_size) for p in paths]
    assert all(isinstance(m, ModelInput) and m.pixels.dtype == np.uint8 for m in prepared)
    assert prepared[-1].shape == load_image(paths[-1]).pixels.shape  # the decoded size, for the OOD checks
    direct = predict(tiny_model, [load_image(p) for p in paths])
    assert predict(tiny_model, prepared) == direct
    with pytest.raises(ValueError, match="the model takes"):
        model_input(prepared[0], tiny_model.image_size * 2)


def test_the_pipeline_gives_the_network_half_the_cores_and_gives_them_back(tiny_model, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert cpu_allocation() == (4, 5)
        assert cpu_allocation(workers=2) == (4, 2)
        seen = []
        for _ in score_paths(tiny_model, iter_shard([str(DATASET)]), batch_size=4, workers=1):
            seen.append(torch.get_num_threads())
        assert seen and set(seen) == {4}
        assert torch.get_num_threads() == 8
        torch.set_num_threads(3)
        assert cpu_allocation() == (3, 6)  # never more threads than the caller allowed
    finally:
        torch.set_num_threads(threads)


def test_predict_runs_a_batchnorm_folded_copy_that_scores_like_the_trained_net(tiny_model):
    folded = tiny_model.inference_net
    assert folded is tiny_model.inference_net  # made once
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.net.modules())  # fine-tuning needs them
    x = torch.from_numpy(np.stack([read_model_input(p, tiny_model.image_size).pixels
                                   for p in sorted(DATASET.rglob("*.jpeg"))])).unsqueeze(1).float()
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), tiny_model.net(x), rtol=1e-4, atol=1e-4)
        assert not torch.equal(folded.stem[0].weight, tiny_model.net.stem[0].weight)  # really folded
