"""Download pre-tokenized FineWeb shards (GPT-2 tokens) from the Hugging Face hub.

    python data/cached_fineweb10B.py        # val shard + 18 train shards (1.8B tokens) -> data/fineweb10B/
    python data/cached_fineweb10B.py 9      # 9 train shards: enough for shorter runs

huggingface_hub does the transfer (progress bars, retries, resuming an interrupted file).
Shards already present and valid are not fetched again (no request is made for them);
every shard is checked (magic, version, size against the header's token count), and a bad
one is named, removed and fetched again. An unreachable hub ends the run within seconds.
"""

import argparse
import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.flags import FlagParser  # noqa: E402
from data.shards import check_shard  # noqa: E402

HERE = Path(__file__).resolve().parent
# name: (dataset repo, file prefix, number of train shards or None if unknown here)
SETS = {
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb", None),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", None),
}
RECORD_SHARDS = 18  # the record run reads ~1.7B tokens; shards hold 100M each


def hub_error(e, what, repo_id):
    """A one-line message, saying what to do, for an exception raised by huggingface_hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.is_offline_mode():
        return f"cannot download {what}: HF_HUB_OFFLINE is set; unset it and run again"
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return unreachable(what)
    if isinstance(e, RepositoryNotFoundError):
        return (
            f"dataset repo {repo_id} was not found on the hub: check its name, "
            "or log in with `hf auth login` if it is private or gated"
        )
    if isinstance(e, RevisionNotFoundError):
        return f"dataset repo {repo_id} has no such revision: check the repo on the hub"
    if isinstance(e, RemoteEntryNotFoundError):
        return f"{what} is not in dataset repo {repo_id}: ask for fewer shards, or check the repo's file list"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while downloading {what}: free some space (each shard is ~200 MB) and run again"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"could not download {what} from {repo_id}: {first}; run again, or check the hub's status"


def unreachable(what, endpoint=None):
    from huggingface_hub import constants

    return (
        f"cannot reach the Hugging Face hub at {endpoint or constants.ENDPOINT} to get {what} (no network?): "
        "check the internet connection (or set HF_ENDPOINT to a mirror) and run again, or make shards of "
        "your own text with data/fineweb.py --input <your .txt files>"
    )


def reach_hub(what, endpoint=None):
    """Exit in one line when the hub cannot be reached.

    (huggingface_hub alone would retry for ~24 s, 12 warnings long.)"""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return  # the download then fails at once, and hub_error names HF_HUB_OFFLINE
    try:
        # any HTTP answer, even an error, will do
        get_session().head(endpoint or constants.ENDPOINT, timeout=5)
    except Exception:  # noqa: BLE001 -- DNS, refused, timeout, proxy or TLS failure: all mean unreachable
        raise SystemExit(unreachable(what, endpoint)) from None


def _valid(path):
    """True if `path` is a good shard; a bad one is reported by name and removed."""
    if not path.exists():
        return False
    try:
        check_shard(path)
        return True
    except ValueError as e:
        print(f"{e}; removing it to fetch it again", file=sys.stderr)
        path.unlink()
        return False


def fetch(n=RECORD_SHARDS, dataset="fineweb10B", local_dir=None, endpoint=None):
    """Make sure the val shard and the first `n` train shards of `dataset` are in `local_dir`.

    Returns their paths."""
    repo_id, prefix, total = SETS[dataset]
    if n < 0 or (total is not None and n > total):
        raise SystemExit(
            f"N={n} is out of range: {dataset} has {total} train shards; pick N from 0 to {total}"
        )
    local_dir = Path(local_dir or HERE / dataset)
    names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, n + 1)]
    paths = [local_dir / name for name in names]
    todo = [p for p in paths if not _valid(p)]
    if not todo:
        print(f"all {len(paths)} shards of {dataset} are present and valid in {local_dir}")
        return paths
    reach_hub(todo[0].name, endpoint)
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create {local_dir}: {e.strerror}; pick another folder with --dir") from None
    from huggingface_hub import hf_hub_download

    print(f"downloading {len(todo)} of {len(paths)} shards of {dataset} from {repo_id} into {local_dir}")
    for k, path in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {path.name}", flush=True)
        try:
            hf_hub_download(repo_id, path.name, repo_type="dataset", local_dir=local_dir, endpoint=endpoint)
        except Exception as e:  # noqa: BLE001 -- every hub failure becomes one line saying what to do
            raise SystemExit(hub_error(e, path.name, repo_id)) from None
        if not _valid(path):
            raise SystemExit(
                f"{path.name} from {repo_id} is not a valid shard (removed): run again to re-fetch it"
            )
    print(f"done: {len(paths)} shards of {dataset} checked in {local_dir}")
    return paths


def main(argv=None):
    p = FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "n",
        nargs="?",
        type=int,
        default=RECORD_SHARDS,
        metavar="N",
        help=f"number of train shards of 100M tokens to fetch, besides the val shard (default "
        f"{RECORD_SHARDS}:\nthe ~1.7B tokens the record run needs; 9 suffice for shorter runs; "
        f"fineweb10B has 103)",
    )
    p.add_argument(
        "--set",
        dest="dataset",
        choices=SETS,
        default="fineweb10B",
        help="which pre-tokenized set (default fineweb10B, repo kjj0/fineweb10B-gpt2)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="where to put the shards (default data/<set>/, "
        "where train_gpt2.py's default --input_bin looks for fineweb10B)",
    )
    args = p.parse_args(argv)
    try:
        fetch(args.n, args.dataset, args.dir)
    except KeyboardInterrupt:
        print("cached_fineweb10B.py: interrupted; run it again to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
