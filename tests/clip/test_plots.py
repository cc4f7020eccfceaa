"""The run's plots say what they show: a legend for the curves' line styles, per-bin counts
under the reliability diagrams, and what each shift's images are made of."""
import numpy as np

from kalman_kernels.clip import run as R
from kalman_kernels.clip.data import get_dataset


def _records():
    edges = np.linspace(0, 1, 16).tolist()
    out = []
    for seed in (0, 1):
        for m in ("zero-shot", "adamw", "kalman"):
            metrics = {sp: {"acc": 0.5 + 0.1 * seed, "nll": 1.0, "ece": 0.1}
                       for sp in ("val", "test", "blur1", "blur2", "noise0.1")}
            history = [] if m == "zero-shot" else [
                {"step": s, "images_seen": 32 * s, "val_acc": 0.4 + 0.05 * s,
                 "val_nll": 2 - 0.1 * s}
                for s in range(4)]
            count = [0] * 10 + [5, 10, 20, 40, 25]
            out.append({"method": m, "shots": 4, "seed": seed, "history": history,
                        "metrics": metrics, "seconds": 0.1,
                        "reliability": {"edges": edges, "count": count,
                                        "accuracy": [None] * 10 + [0.5, 0.6, 0.7, 0.8, 0.9]}})
    return out


def test_plots_carry_legends_counts_and_the_shift_composition(tmp_path, monkeypatch):
    figures = {}
    save = R._save

    def keep(fig, path, **layout):
        figures[path.name] = fig
        return save(fig, path, **layout)

    monkeypatch.setattr(R, "_save", keep)
    records = _records()
    severity = {"blur1": ("blur", 1.0), "blur2": ("blur", 2.0), "noise0.1": ("noise", 0.1)}
    notes = {"blur": "blur of the noisy test images", "noise": "noisier test images"}
    files = R.make_plots(records, R.aggregate(records), severity, tmp_path, "toy",
                         shift_notes=notes)
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["curves.png", "ood_severity.png",
                                                           "reliability.png"]
    curves = figures["curves.png"]
    legend = [t.get_text() for lg in curves.legends for t in lg.get_texts()]
    assert "adamw" in legend and any("dotted" in t for t in legend)
    assert any("training-free" in t for t in legend)
    assert all(len(a.get_title()) < 40 for a in curves.axes)      # titles fit their panels
    rel = figures["reliability.png"]
    strips = [a for a in rel.axes if a.get_xlabel() == "confidence"]
    assert len(strips) == 3                                       # one count strip per method
    assert max(p.get_height() for p in strips[0].patches) == 2 * 40   # pooled over 2 seeds
    sev = figures["ood_severity.png"]
    titles = [a.get_title().replace("\n", " ") for a in sev.axes]
    assert titles == ["blur of the noisy test images", "noisier test images"]
    assert sev.legends and "sigma in pixels" in sev.axes[0].get_xlabel()


def test_builtin_tasks_name_how_each_shift_meets_the_domain_noise():
    ds = get_dataset("digits-noisy")
    kinds = {k for k, _ in ds.ood_severity.values()}
    assert set(ds.shift_notes) == kinds
    assert "noisy test images" in ds.shift_notes["blur"]
    assert "0.15" in ds.shift_notes["noise"]
