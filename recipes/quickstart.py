"""The main job on the embedded default: ``python -m recipes.quickstart [--output-dir DIR]``.

Builds the offline toy testbed (a tiny Llama pretrained on arithmetic, cached on disk),
then runs each method of the suite on it and prints one results table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where results and plots are written")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    from trl_ext.toy import pretrain_metrics, pretrained_toy_model_path

    start = time.perf_counter()
    path = pretrained_toy_model_path()
    metrics = pretrain_metrics(path)
    rows = [
        (
            "toy testbed",
            f"tiny Llama ({metrics['config']['model']['hidden_size']}d x "
            f"{metrics['config']['model']['num_hidden_layers']}L) on a+b",
            "held-out accuracy",
            f"{metrics['heldout_accuracy']:.1%}",
            f"trained in {metrics['train_seconds']:.0f} s",
        )
    ]
    header = ("step", "what it trained", "metric", "value", "note")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    result = {"model_path": path, "pretrain": metrics, "seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nmodel: {path}\nresults: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
