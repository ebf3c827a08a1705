"""The demo pipeline end to end on a small demo plate, with a transparent embedder."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import torch

from plate_concepts.demo_pipeline import DemoSettings, format_report, run_demo_pipeline


class StainMeans:
    """Patch tokens = per-stain mean intensity of 16-px patches (d = 5): brighter ER is then a
    direct shift of one coordinate, which the dictionary must pick out."""

    name = "stain-means-16"
    dim = None

    def patch_grid(self, crop_size: int) -> tuple[int, int]:
        return crop_size // 16, crop_size // 16

    def to(self, device):
        return self

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(crops.float(), 16).permute(0, 2, 3, 1)


def test_pipeline_reports_every_planted_concept_and_reuses_its_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("PLATE_CONCEPTS_CACHE", str(tmp_path / "cache"))
    settings = DemoSettings(
        n_wells=24, fields_per_well=1, field_size=256, crop_size=64, model=StainMeans(),
        n_features=12, n_rounds=1, per_round=2, steps=80, batch_size=64, device="cpu",
    )
    messages: list[str] = []
    run = run_demo_pipeline(tmp_path / "work", settings, log=messages.append)
    report = run.report
    assert set(report["concept"]) == {
        "er-stress", "mito-fragmentation", "multinucleation", "nuclear-enlargement",
        "epithelial-like", "fibroblast-like",
    }
    ground_truth = pd.read_parquet(run.plate_dir / "ground_truth.parquet")
    assert (report["n_cells"] == len(ground_truth)).all()
    assert report["cell_auc"].between(0, 1).all()
    assert report["max_selectivity"].between(-1, 1).all()
    er = report.set_index("concept").loc["er-stress"]
    assert er["max_selectivity"] > 0.3 and er["cell_auc"] > 0.7
    saved = json.loads((tmp_path / "work" / "concept_report.json").read_text())
    assert [row["concept"] for row in saved] == list(report["concept"])
    assert "er-stress" in format_report(report)

    # a second run reuses the plate, the store and the dictionary
    stamp = run.dictionary_path.stat().st_mtime_ns
    again = run_demo_pipeline(tmp_path / "work", settings, log=messages.append)
    assert run.dictionary_path.stat().st_mtime_ns == stamp
    assert "already fitted" in messages[-2]
    pd.testing.assert_frame_equal(again.report, report)

    # sized from the store (the default): the file and the log name the size chosen
    auto = run_demo_pipeline(tmp_path / "work", replace(settings, n_features=None), log=messages.append)
    n_features = auto.explorer.n_features
    assert auto.dictionary_path.name.endswith(f"-icfl-M{n_features}-J1L2.safetensors")
    assert any(f"ICFL with {n_features} features" in message for message in messages)


def test_the_report_table_is_aligned_whatever_the_label_lengths():
    report = pd.DataFrame(
        {
            "label": ["perturbation", "cell_type"],
            "concept": ["mitochondrial-fragmentation-and-a-long-name", "er"],
            "feature": [12, 7],
            "max_selectivity": [0.4671, 0.5],
            "average_selectivity": [0.494, 0.5],
            "cell_auc": [0.957, 0.97],
        }
    )
    lines = format_report(report).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[1].startswith("perturbation: mitochondrial-fragmentation-and-a-long-name  ")
    ends = [line.index("0.467") + 5 for line in lines[1:2]] + [lines[2].index("0.500") + 5]
    assert ends[0] == ends[1] == lines[0].index("max sel.") + len("max sel.")
