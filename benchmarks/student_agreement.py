"""Where a distilled student departs from its teacher: the same labels and seeds through both, judged by BloodNet.

    python benchmarks/student_agreement.py --teacher experiments/runs/ldm-64-4k-teacher-gi/pipeline \
        --student experiments/runs/ldm-64-4k-fast-gi/pipeline --student-steps 2,3,4 --n-per-class 200 \
        --out experiments/reports/ldm-64-4k-agreement [--seed 0] [--bloodnet PATH] [--overwrite]

A reflow student learns its teacher's map from noise to image, so from one seed and label both should draw the
same cell. Each model samples --n-per-class images of every class with its own default settings (the student at
each of --student-steps), image i of class i mod C with seed S+i, as `bloodgen-hf sample --distribution balanced`
does. BloodNet (the bundled one of the models' size unless --bloodnet) classifies every image. Per class the
report gives: the share of the teacher's images it recognises, of the student's, the share the teacher got right
and the student wrong (cells the distillation lost) and the reverse (gained), and the median BloodNet-feature
distance between the two images of a seed against that between two seeds of one class (unrelated cells): well
below 1, the student draws the teacher's cell. Generated images only, so no data split is touched.

Writes <out>/report.md, <out>/results.json and <out>/lost.png (the worst class's lost cells: the teacher's image
over the student's at each step count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path, labelled_class_grid
from bloodgen_hf.registry import ModelLoadError, load_pipeline
from bloodgen_hf.sampling import check_output, configure_sampling, generate, model_labels, pipeline_class_names

SHOWN = 8  # lost cells in the picture


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's pipeline folder or bundled name")
    parser.add_argument("--student", required=True, help="the student's pipeline folder or bundled name")
    parser.add_argument("--student-steps", default="", help="comma-separated step counts (default: its own)")
    parser.add_argument("--n-per-class", type=int, default=200, help="images of each class per model")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed+i in every model")
    parser.add_argument("--bloodnet", default=None, help="classifier folder (default: the bundled one of that size)")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (as `bloodgen-hf sample`)")
    parser.add_argument("--out", type=Path, default=Path("experiments/reports/student-agreement"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    if args.n_per_class < 2:
        parser.error(f"--n-per-class must be at least 2, got {args.n_per_class}")
    try:
        args.student_steps = [int(s) for s in args.student_steps.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--student-steps must be comma-separated integers, got {args.student_steps!r}")
    if any(s < 1 for s in args.student_steps):
        parser.error(f"--student-steps must be at least 1, got {args.student_steps}")
    return args


def load_pair(teacher: str, student: str) -> tuple[object, object, tuple[str, ...]]:
    """Both pipelines on the CPU; they must make images of one size and name the same classes."""
    t, s = load_pipeline(teacher, "cpu"), load_pipeline(student, "cpu")
    if t.resolution != s.resolution:
        raise UsageError(f"the teacher makes {t.resolution} px images, the student {s.resolution} px")
    names, theirs = pipeline_class_names(t), pipeline_class_names(s)
    if theirs != names:
        raise UsageError(f"the teacher's classes {list(names)} are not the student's {list(theirs)}")
    return t, s, names


def sample(pipe, labels: np.ndarray, seed: int, precision: str, steps: int | None = None) -> np.ndarray:
    """uint8 [N, R, R, 3]: `labels` with seeds seed+i, the pipeline's defaults but `steps`."""
    options = {"precision": precision} | ({"num_inference_steps": steps} if steps else {})
    pipe, kwargs = configure_sampling(pipe, options)
    return np.concatenate([b[0] for b in generate(pipe, labels, seed=seed, batch_size=250, **kwargs)])


def unit_rows(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)


def agreement(labels: np.ndarray, teacher: dict, student: dict, names: tuple[str, ...]) -> dict:
    """Per class and overall: recognised shares, lost/gained shares, and the same-seed against other-seed
    feature distance (class c's images in plan order; 'other seed' pairs image k with image k-1 of its class,
    cyclically)."""
    t_ok, s_ok = teacher["pred"] == labels, student["pred"] == labels
    same = np.linalg.norm(teacher["features"] - student["features"], axis=1)
    rows = {}
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        other = np.linalg.norm(teacher["features"][idx] - np.roll(teacher["features"][idx], 1, axis=0), axis=1)
        rows[name] = {
            "teacher": float(t_ok[idx].mean()),
            "student": float(s_ok[idx].mean()),
            "lost": float((t_ok & ~s_ok)[idx].mean()),
            "gained": float((~t_ok & s_ok)[idx].mean()),
            "same_seed_distance": float(np.median(same[idx])),
            "other_seed_distance": float(np.median(other)),
        }
    overall = {key: float(np.mean([r[key] for r in rows.values()])) for key in rows[names[0]]}
    return {"per_class": rows, "mean_over_classes": overall}


def report_lines(args, results: dict) -> list[str]:
    lines = [
        f"# Student against teacher: {args.student}",
        "",
        f"Teacher `{args.teacher}` ({results['teacher_steps']} steps, its defaults); {args.n_per_class} images per "
        "class, the same labels and seeds in both. Command: `python benchmarks/student_agreement.py --teacher "
        f"{args.teacher} --student {args.student} --student-steps {','.join(map(str, results['steps']))} "
        f"--n-per-class {args.n_per_class} --seed {args.seed}"
        f"{' --bloodnet ' + args.bloodnet if args.bloodnet else ''} --out {args.out}`.",
        "",
        "Recognised: BloodNet's class is the label. Lost: the teacher's image recognised, the student's from the same "
        "seed not. Distance ratio: median BloodNet-feature distance between the two images of a seed over that "
        "between two seeds of the class (1: unrelated cells).",
        "",
    ]
    for steps, result in results["students"].items():
        lines += [
            f"## Student at {steps} steps",
            "",
            "| class | teacher recognised | student recognised | lost | gained | distance ratio |",
            "|---|---|---|---|---|---|",
        ]
        rows = [*result["per_class"].items(), ("mean", result["mean_over_classes"])]
        for name, r in rows:
            ratio = r["same_seed_distance"] / max(r["other_seed_distance"], 1e-12)
            lines.append(
                f"| {name} | {r['teacher']:.3f} | {r['student']:.3f} | {r['lost']:.3f} | {r['gained']:.3f} "
                f"| {ratio:.2f} |"
            )
        lines.append("")
    return lines


def lost_picture(labels, teacher: dict, students: dict, names: tuple[str, ...], worst: int):
    """Up to SHOWN seeds of class `worst` the first student step count lost: teacher on top, students below."""
    first = next(iter(students.values()))
    idx = np.flatnonzero((labels == worst) & (teacher["pred"] == labels) & (first["pred"] != labels))[:SHOWN]
    if len(idx) == 0:
        return None
    rows = [teacher["images"][idx]] + [s["images"][idx] for s in students.values()]
    row_names = ["teacher"] + [f"student, {steps} steps" for steps in students]
    return labelled_class_grid(np.stack(rows), [f"{n} ({names[worst]})" for n in row_names])


def run(args) -> dict:
    from bloodgen_hf.evaluation.features import BloodNetExtractor

    check_output(args.out, args.overwrite)  # before the sampling, not after it
    teacher_pipe, student_pipe, names = load_pair(args.teacher, args.student)
    bloodnet = BloodNetExtractor.load(args.bloodnet, resolution=teacher_pipe.resolution)
    if tuple(bloodnet.class_names) != names:
        raise UsageError(f"the classifier's classes {list(bloodnet.class_names)} are not the models' {list(names)}")
    labels, _ = model_labels(teacher_pipe, args.n_per_class * len(names), None, "balanced")
    steps = args.student_steps or [student_pipe.default_steps()]

    def judged(images: np.ndarray) -> dict:
        features = bloodnet.extract(images, progress=False)
        return {"images": images, "pred": features.probs.argmax(1), "features": unit_rows(features.features)}

    print(f"teacher: {len(labels)} images", flush=True)
    teacher = judged(sample(teacher_pipe, labels, args.seed, args.precision))
    students = {}
    for s in steps:
        print(f"student at {s} steps: {len(labels)} images", flush=True)
        students[s] = judged(sample(student_pipe, labels, args.seed, args.precision, s))
    results = {
        "teacher": args.teacher,
        "student": args.student,
        "teacher_steps": teacher_pipe.default_steps(),
        "steps": steps,
        "n_per_class": args.n_per_class,
        "seed": args.seed,
        "class_names": list(names),
        "bloodnet": bloodnet.identity,
        "students": {s: agreement(labels, teacher, judged_s, names) for s, judged_s in students.items()},
    }
    first = results["students"][steps[0]]["per_class"]
    worst = names.index(max(first, key=lambda name: first[name]["lost"]))
    picture = lost_picture(labels, teacher, students, names, worst)
    with atomic_path(args.out, is_dir=True, overwrite=args.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        lines = report_lines(args, results)
        if picture is not None:
            picture.save(tmp / "lost.png")
            lines += [f"![lost cells of {names[worst]}](lost.png)", ""]
        (tmp / "report.md").write_text("\n".join(lines))
    print(f"wrote {args.out}/report.md")
    return results


def main(argv: list[str] | None = None) -> dict:
    from bloodgen_hf.process import tune_malloc

    tune_malloc()
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, ModelLoadError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
