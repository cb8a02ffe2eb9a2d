"""What every benchmark shares: its common flags, and its results file's header.

Every script runs from the repository root as ``python benchmarks/<name>.py`` and takes the same
common flags (:func:`add_common_flags`): ``--output`` (the results file), ``--threads`` (torch's
intra-op threads, also passed to worker processes as ``OMP_NUM_THREADS``), ``--seed`` and, where it
times something, ``--rounds``. :func:`results_header` gives the command line, git commit, library
versions, CPU, thread count and machine load as ``#`` lines; :func:`write_results` writes a results
file headed by them. Scripts import this module as ``harness``; importing it puts the repository
root first on the path, so a benchmark measures this checkout's code and can reuse the recipes'
helpers (``recipes.timing``).

Example:
    ```py
    >>> from harness import write_results
    >>> write_results("benchmarks/results/my_benchmark.txt", "\\n".join(lines))
    ```
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path[:2]:
    sys.path.insert(1, str(ROOT))
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")


# Outputs, not code: a results file or README table rewritten by an earlier benchmark leaves the measured code as
# committed, so the next benchmark of a regeneration run still records a clean commit.
NOT_CODE = ("benchmarks/results", "README.md")


def git_commit() -> str:
    """The checked-out commit, with ``+uncommitted changes`` when tracked files other than :data:`NOT_CODE` differ."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in NOT_CODE)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" +uncommitted changes" if dirty else "")


def cpu_name() -> str:
    """The CPU model as the OS reports it, and the number of logical cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} logical cores available"


def versions() -> str:
    """Python and library versions, ``name version`` separated by commas."""
    found = [f"python {platform.python_version()}"]
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def thread_count() -> str:
    """torch's intra-op thread count and where it came from."""
    import torch

    env = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return f"{torch.get_num_threads()} (" + ", ".join(f"{k}={v}" for k, v in env.items()) + ")"


def load_average() -> str:
    """The OS load averages over 1, 5 and 15 minutes: above the core count, timings are inflated by other work."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# What the run started with: the header describes the code and machine load at the start, not at the end.
_AT_START = {"commit": git_commit(), "load": load_average()}


def results_header(argv: list[str] | None = None) -> str:
    """``#`` lines naming the command, git commit, library versions, CPU, thread count, machine load and date."""
    argv = sys.argv if argv is None else argv
    script = argv[0]
    try:
        script = str(Path(script).resolve().relative_to(ROOT))
    except ValueError:
        pass
    command = " ".join(shlex.quote(a) for a in ["python", script, *argv[1:]])
    return "\n".join(
        [
            f"# command: {command}",
            f"# git commit: {_AT_START['commit']}",
            f"# versions: {versions()}",
            f"# cpu: {cpu_name()}",
            f"# threads: {thread_count()}",
            f"# load average (1, 5, 15 min) at start: {_AT_START['load']}",
            f"# date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        ]
    )


def write_results(
    path: str | os.PathLike, text: str, argv: list[str] | None = None, header: str | None = None
) -> Path:
    """Write ``text`` to ``path`` under ``header`` (default: :func:`results_header` now); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((header or results_header(argv)) + "\n\n" + text.rstrip("\n") + "\n")
    return path


class _Tee:
    """A text stream that writes to the real stdout and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def recording(path: str | os.PathLike, argv: list[str] | None = None):
    """Print as usual inside the block, and on success save everything printed to ``path`` under the header.

    Example:
        ```py
        >>> with recording(RESULTS / "mora_speed.txt"):
        ...     main()
        ```
    """
    header = results_header(argv)
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield tee
    finally:
        sys.stdout = tee.stream
    print(f"saved to {write_results(path, ''.join(tee.parts), header=header)}")


def add_common_flags(
    parser,
    output: str | os.PathLike,
    *,
    rounds: int | None = None,
    rounds_help: str = "timed repetitions",
    threads: int | list[int] = 1,
    seed: int | list[int] = 0,
):
    """Add ``--output``, ``--threads``, ``--seed`` and (when ``rounds`` is given) ``--rounds`` to ``parser``.

    A list default for ``threads`` or ``seed`` makes that flag take one or more values, for the scripts that
    repeat a run per thread count or per seed. Returns ``parser``.
    """
    shown = Path(output).relative_to(ROOT) if Path(output).is_relative_to(ROOT) else output
    parser.add_argument("--output", type=Path, default=Path(output), help=f"results file (default: {shown})")
    each = "; one run per value" if isinstance(threads, list) else ""
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+" if each else None,
        default=threads,
        help=f"torch intra-op threads, also OMP_NUM_THREADS of worker processes{each} (default: %(default)s)",
    )
    each = "; one run per value" if isinstance(seed, list) else ""
    parser.add_argument(
        "--seed", type=int, nargs="+" if each else None, default=seed, help=f"random seed{each} (default: %(default)s)"
    )
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default: %(default)s)")
    return parser


def positive(name: str, value: int) -> int:
    """``value`` if it is at least 1; otherwise a clear error naming the flag."""
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, got {value}")
    return value


def apply_common_flags(args):
    """Check the common flags, set torch's thread count and seed every generator; return ``args``.

    A list of thread counts or seeds (one run per value) is checked but not applied: each run applies its own.
    """
    import torch
    from transformers import set_seed

    threads = args.threads if isinstance(args.threads, list) else [args.threads]
    for value in threads:
        positive("--threads", value)
    if getattr(args, "rounds", None) is not None:
        positive("--rounds", args.rounds)
    for seed in args.seed if isinstance(args.seed, list) else [args.seed]:
        if not 0 <= seed < 2**32:
            raise SystemExit(f"--seed must be in [0, 2**32), got {seed}")
    # Before the run, not after it: a results file that cannot be written would lose the whole measurement.
    output = Path(args.output)
    if output.is_dir():
        raise SystemExit(f"--output {output} is a folder; name the results file, e.g. {output / 'results.txt'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--output {output}: cannot create its folder ({error}); choose a writable path") from None
    if not os.access(output.parent, os.W_OK):
        raise SystemExit(f"--output {output}: its folder is not writable; choose a writable path")
    if not isinstance(args.threads, list):
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not isinstance(args.seed, list):
        set_seed(args.seed)
    return args


def ratio_text(numerator: float, denominator: float, spec: str = ".2f") -> str:
    """``numerator / denominator`` formatted by ``spec``, or ``n/a`` where the denominator is not positive (a peak
    memory that did not grow measurably at a tiny shape)."""
    return format(numerator / denominator, spec) if denominator > 0 else "n/a"


def parse_or_work(parser, argv, worker):
    """Parse ``argv`` (``sys.argv[1:]`` when None) with a hidden ``--worker JOB`` flag added. Given one, run
    ``worker(job)`` in this process, print its JSON result for :func:`run_worker` and return None; else return the
    parsed arguments."""
    import argparse
    import json

    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if cli.worker:
        print(json.dumps(worker(json.loads(cli.worker))))
        return None
    return cli


def run_worker(script: str, job: dict) -> dict:
    """Run ``script --worker <job as JSON>`` in a fresh process with ``job["threads"]`` threads; return the JSON
    its last output line holds (one process per measurement, so each side's peak memory is its own)."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(script).resolve().parents[1],
    )
    if done.returncode:
        raise RuntimeError(f"worker {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_layer_model(model_type: str, heads: int, head_dim: int, kv_heads: int, max_len: int, seed: int = 0, **config):
    """``(model, tokenizer)``: one random decoder layer of ``model_type`` (fp32, ``sdpa``, hidden 1024 and MLP 4096
    unless ``config`` says otherwise) with the toy tokenizer's vocabulary, as the speed benchmarks measure it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_trl_testbed import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    settings = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 1, **config}
    model_config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer
