"""`make eval`: prompt adherence of the served model, measured through the real mesh.

Starts every service as its own process (videomesh.mesh.LocalMesh), generates a clip for
each held-out phrasing in English, Chinese and Japanese through the gateway, decodes the
delivered MP4 and lets the independent OpenCV detector (videomesh.world.detector) name the
colour, shape and motion it sees. Prints the table the model card quotes, plus the
denoiser's wall time per clip (from the job's stage events).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gateway.media import read_frames
from services.denoiser.train import training_vocabulary
from videomesh.client import VideoClient
from videomesh.mesh import LocalMesh
from videomesh.v1 import common_pb2
from videomesh.world import LANGS, detect, heldout_only_words, heldout_prompts, score

TARGETS = {"color": 0.95, "shape": 0.85, "motion": 0.90}


def _seconds(events, stage_a: int, stage_b: int) -> float:
    times = {
        e.stage_started.stage: e.time.ToNanoseconds() / 1e9
        for e in events
        if e.WhichOneof("event") == "stage_started"
    }
    return times.get(stage_b, 0.0) - times.get(stage_a, 0.0)


def run(per_lang: int, seed: int, out_json: Path | None, size: str, step_cache: float = 0.0,
        mesh: LocalMesh | None = None) -> dict:  # fmt: skip
    """step_cache: the threshold every clip asks for (0 = off); mesh: a running one to use (else one
    is started and stopped here)."""
    with tempfile.TemporaryDirectory(prefix="videomesh-eval-") as d:
        if mesh is not None:
            return _run(mesh, per_lang, seed, out_json, size, step_cache)
        with LocalMesh(Path(d) / "data") as started:
            return _run(started, per_lang, seed, out_json, size, step_cache)


def _run(
    mesh: LocalMesh, per_lang: int, seed: int, out_json: Path | None, size: str, step_cache: float
) -> dict:
    rows = []
    client = VideoClient(mesh.addresses["gateway"], mesh.api_key)
    w, h = (int(v) for v in size.split("x"))
    for lang in LANGS:
        unseen = heldout_only_words(lang)
        for i, (prompt, spec) in enumerate(heldout_prompts(lang, per_lang, seed=seed)):
            events = list(
                client.generate(
                    common_pb2.VideoSpec(
                        prompt=prompt, seed=seed * 1000 + i, width=w, height=h, step_cache=step_cache
                    )
                )
            )
            last = events[-1]
            if last.WhichOneof("event") != "completed":
                raise RuntimeError(f"{prompt!r}: {last}")
            video = last.completed.video
            frames = read_frames(Path(video.result.uri.removeprefix("file://")))
            det = detect(frames)
            rows.append({
                "lang": lang, "prompt": prompt, "expected": spec.__dict__ if hasattr(spec, "__dict__") else str(spec),
                "detected": {k: getattr(det, k) for k in ("color", "shape", "motion", "size", "background")},
                "score": score(det, spec), "unseen_words": any(u in prompt for u in unseen),
                # per attribute: is the word that names it held-out-only? (a held-out motion
                # word does not make the shape word unseen)
                "unseen_by_attribute": unseen_by_attribute(lang, prompt),
                "denoise_s": _seconds(events, common_pb2.STAGE_DENOISING, common_pb2.STAGE_UPSCALING),
                "total_s": (events[-1].time.ToNanoseconds() - events[0].time.ToNanoseconds()) / 1e9,
                "qc_passed": video.quality.passed,
                "step_cache": step_cache,
                "model": video.model,  # name@version of the weights that drew it
            })  # fmt: skip
    client.close()
    summary = summarize(rows)
    summary["vocabulary"] = training_vocabulary()
    summary["model"] = ", ".join(sorted({r["model"] for r in rows}))
    if out_json:
        out_json.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    return summary


def unseen_by_attribute(lang: str, prompt: str) -> dict[str, bool]:
    """For colour, shape and motion: does the prompt name it with a held-out-only word?"""
    return {k: any(u in prompt for u in heldout_only_words(lang, k)) for k in ("color", "shape", "motion")}


def summarize(rows: list[dict]) -> dict:
    """Rows of one evaluation -> the per-language table, timings and the rows themselves."""
    table = {}
    for lang in LANGS:
        rs = [r for r in rows if r["lang"] == lang]
        table[lang] = {
            k: float(np.mean([r["score"][k] for r in rs]))
            for k in ("color", "shape", "motion", "size", "background")
        }
        table[lang]["n"] = len(rs)
        # the same prompts split by vocabulary: those whose words all occur in training captions
        # (phrasings still held out) against those with a held-out-only word ("橘色", "sphere")
        seen = [r for r in rs if not r["unseen_words"]]
        table[lang]["n_seen_words"] = len(seen)
        for k in ("color", "shape", "motion"):
            table[lang][f"{k}_seen_words"] = (
                float(np.mean([r["score"][k] for r in seen])) if seen else float("nan")
            )
            # per attribute: the clips whose word for this attribute occurs in training captions
            known = [r for r in rs if not r["unseen_by_attribute"][k]]
            table[lang][f"{k}_known_word"] = (
                float(np.mean([r["score"][k] for r in known])) if known else float("nan")
            )
            table[lang][f"n_{k}_known_word"] = len(known)
    summary = {
        "table": table,
        "denoise_seconds_median": statistics.median(r["denoise_s"] for r in rows),
        "clip_seconds_median": statistics.median(r["total_s"] for r in rows),
        "qc_pass_rate": float(np.mean([r["qc_passed"] for r in rows])),
        "rows": rows,
    }
    return summary


def print_table(summary: dict) -> bool:
    ok = True
    print(
        f"{'lang':<5} {'n':>4} {'colour':>8} {'shape':>8} {'motion':>8} {'size':>8} {'bg':>8}"
        "   prompts without held-out-only words: n colour/shape/motion"
    )
    for lang, r in summary["table"].items():
        print(f"{lang:<5} {r['n']:>4} {r['color']:>8.1%} {r['shape']:>8.1%} {r['motion']:>8.1%} {r['size']:>8.1%} "
              f"{r['background']:>8.1%}   {r['n_seen_words']:>2} {r['color_seen_words']:.1%} / "
              f"{r['shape_seen_words']:.1%} / {r['motion_seen_words']:.1%}")  # fmt: skip
        ok &= all(r[k] >= t for k, t in TARGETS.items())
    print("where the word naming the attribute is not held-out-only: n colour / n shape / n motion")
    for lang, r in summary["table"].items():
        print(f"{lang:<5} " + " / ".join(f"{r[f'n_{k}_known_word']} {r[f'{k}_known_word']:.1%}"
                                         for k in ("color", "shape", "motion")))  # fmt: skip
    if summary.get("model"):
        print(f"model: {summary['model']}")
    if summary.get("vocabulary") == "full":
        print(
            "(this model was trained with --vocabulary full: the held-out-only words were in its training captions)"
        )
    print(f"targets: colour ≥ 95%, shape ≥ 85%, motion ≥ 90% per language: {'MET' if ok else 'NOT MET'}")
    print(f"denoiser time per clip (median): {summary['denoise_seconds_median']:.2f} s; "
          f"whole job: {summary['clip_seconds_median']:.2f} s; QC pass rate {summary['qc_pass_rate']:.0%}")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="videomesh eval", description="prompt adherence on held-out phrasings, through the mesh"
    )
    p.add_argument("--per-lang", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="256x256")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument("--step-cache", type=float, default=0.0,
                   help="step caching threshold every clip asks for (0 = off): its adherence against uncached")  # fmt: skip
    p.add_argument("--table-from", type=Path, default=None,
                   help="print the table of an earlier run's --json file (no mesh, nothing generated)")  # fmt: skip
    a = p.parse_args(argv)
    if a.table_from:
        saved = json.loads(a.table_from.read_text())
        for r in saved["rows"]:  # files from before the per-attribute split
            r.setdefault("unseen_by_attribute", unseen_by_attribute(r["lang"], r["prompt"]))
        meta = {"vocabulary": saved.get("vocabulary", "core"), "model": saved.get("model", "")}
        return 0 if print_table({**summarize(saved["rows"]), **meta}) else 1
    t0 = time.time()
    summary = run(a.per_lang, a.seed, a.json, a.size, a.step_cache)
    ok = print_table(summary)
    print(f"({time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
