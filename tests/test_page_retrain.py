"""Retrain page (AppTest): folder checks with their messages, a real tiny training started from the
form and seen to finish, a second tab that sees the running job and cancels it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from conftest import DATASET, FIXTURES, GENERATED
from xray.train import jobs
from xray.model.registry import Registry

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "retrain.py")
TIMEOUT_S = 120


@pytest.fixture
def page_env(tiny_registry, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XRAY_DATA_ROOTS", os.pathsep.join([str(tmp_path), str(FIXTURES)]))
    st.cache_data.clear()  # folder checks are cached per process; each test has its own roots
    return tiny_registry


def open_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    return at


def enter_folder(at: AppTest, folder) -> AppTest:
    at.text_input(key="retrain_folder").input(str(folder)).run()
    assert not at.exception
    return at


def tiny_settings(at: AppTest, epochs: int) -> None:
    at.number_input(key="retrain_epochs").set_value(epochs)
    at.number_input(key="retrain_image_size").set_value(64)
    at.number_input(key="retrain_batch_size").set_value(8)
    at.number_input(key="retrain_val_fraction").set_value(0.3)
    at.text_input(key="retrain_widths").input("8,16,32,64")


def click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception
    return at


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


def test_good_folder_shows_counts_and_the_patient_split(page_env):
    at = enter_folder(open_page(), DATASET)
    assert "Ready to train: 16 readable images from 14 patients" in texts(at.success)
    counts, split = at.dataframe[0].value, at.dataframe[1].value
    assert counts.loc[0, "NORMAL"] == 8 and counts.loc[0, "PNEUMONIA"] == 8
    assert list(split["used for"]) == ["training", "validation"]
    assert split[["NORMAL", "PNEUMONIA"]].to_numpy().sum() == 16
    assert "patient-level split" in texts(at.caption)
    assert not at.error


def test_broken_files_are_listed_and_skipped(page_env, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DATASET, folder)
    shutil.copy(GENERATED / "truncated.jpeg", folder / "NORMAL" / "truncated.jpeg")
    shutil.copy(GENERATED / "empty.png", folder / "PNEUMONIA" / "empty.png")
    at = enter_folder(open_page(), folder)
    assert "Ready to train: 16 readable images" in texts(at.success)
    assert "2 file(s) cannot be read and will be skipped" in texts(at.warning)
    unreadable = at.dataframe[2].value
    assert sorted(unreadable["file"]) == ["NORMAL/truncated.jpeg", "PNEUMONIA/empty.png"]


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("flat", "no NORMAL/ or PNEUMONIA/ folder"),
    ("one class", "class PNEUMONIA has no images"),
    ("outside", "outside the allowed data folders"),
])
def test_unusable_folder_says_why(page_env, tmp_path, layout, message):
    folder = tmp_path / "data"
    if layout == "flat":
        shutil.copytree(DATASET / "NORMAL", folder)
    elif layout == "one class":
        shutil.copytree(DATASET / "NORMAL", folder / "NORMAL")
        (folder / "PNEUMONIA").mkdir()
    elif layout == "outside":
        folder = FIXTURES.parent.parent / "xray"
    at = enter_folder(open_page(), folder)
    assert message in texts(at.error)
    assert not at.success


def test_fine_tuning_needs_the_active_models_image_size(page_env):
    at = enter_folder(open_page(), DATASET)
    at.number_input(key="retrain_image_size").set_value(96)
    at.radio(key="retrain_start_from").set_value("The active model (fine-tune)")
    at = click(at, "Start training")
    assert "fine-tuning keeps the model's image size: set it to 64" in texts(at.error)
    assert jobs.current_job(page_env) is None  # nothing was started


@pytest.mark.slow
def test_start_tiny_training_from_the_form_and_see_it_finish(page_env):
    registry = Registry(page_env)
    active, before = registry.active_version(), registry.versions()
    at = enter_folder(open_page(), DATASET)
    tiny_settings(at, epochs=2)
    assert at.selectbox(key="retrain_stem").value == "patch4"  # the CLI's default
    at.selectbox(key="retrain_stem").set_value("conv")
    assert at.number_input(key="retrain_members").value == 3  # the CLI's default: the shipped recipe's ensemble
    at.number_input(key="retrain_members").set_value(2)
    at = click(at, "Start training")
    job = jobs.current_job(page_env)
    assert job is not None and job.config.epochs == 2 and job.config.widths == (8, 16, 32, 64)
    assert job.config.stem == "conv" and job.record["argv"][job.record["argv"].index("--stem") + 1] == "conv"
    assert job.config.image_size == 64 and job.config.init_from == ""
    assert job.config.members == 2 and job.record["argv"][job.record["argv"].index("--members") + 1] == "2"
    job = jobs.wait_for_job(page_env, job.id, TIMEOUT_S)
    assert job.state == jobs.SUCCEEDED, job.reason
    at = open_page()  # what anyone opening the page now sees
    # a tiny run on 16 images is no model for patients: no green "finished", the gate says why
    assert f"Training finished: new version **{job.version}**" in texts(at.warning)
    assert "does not pass the promotion gate" in texts(at.warning) and not at.success
    assert job.version in registry.versions() and job.version not in before
    assert registry.active_version() == active
    at.selectbox(key="retrain_recent").set_value(str(DATASET.resolve())).run()
    assert at.text_input(key="retrain_folder").value == str(DATASET.resolve())


def test_second_tab_sees_the_running_job_and_cancels_it(page_env):
    before = Registry(page_env).versions()
    first = enter_folder(open_page(), DATASET)
    tiny_settings(first, epochs=500)
    click(first, "Start training")
    job = jobs.current_job(page_env)
    assert job.running
    second = open_page()  # another browser tab: same job, read from disk
    assert any(s.value == "Training in progress" for s in second.subheader)
    assert next(b for b in second.button if b.label == "Start training").disabled
    click(second, "Cancel training")
    job = jobs.wait_for_job(page_env, job.id, TIMEOUT_S)
    assert job.state == jobs.CANCELLED
    assert "was cancelled" in texts(open_page().warning)
    assert Registry(page_env).versions() == before
