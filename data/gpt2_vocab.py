"""Make tiktoken's "gpt2" encoding work where its download host cannot be reached.

tiktoken downloads the GPT-2 BPE files from openaipublic.blob.core.windows.net and caches each
one as $TIKTOKEN_CACHE_DIR/<sha1 of its URL>, checked against a sha256. The "gpt2" encoding
reads vocab.bpe + encoder.json; "r50k_base" holds the same ranks as one .tiktoken file. When
that host is unreachable, the ranks come from PyPI instead: the openai-whisper sdist ships
them as whisper/assets/gpt2.tiktoken (byte-identical to r50k_base.tiktoken). From the ranks
we rebuild all three files, verify each against tiktoken's own sha256, and place them under
their cache keys, so a plain `tiktoken.get_encoding("gpt2")` works afterwards, offline.

    python data/gpt2_vocab.py   # seeds ~/.cache/tiktoken ($XDG_CACHE_HOME/tiktoken, or $TIKTOKEN_CACHE_DIR)
"""

import base64
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

_HOST = "https://openaipublic.blob.core.windows.net"
R50K_URL = f"{_HOST}/encodings/r50k_base.tiktoken"
_GPT2 = f"{_HOST}/gpt-2/encodings/main"
FILES = {  # URL -> sha256 that tiktoken expects (from tiktoken_ext/openai_public.py)
    R50K_URL: "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    f"{_GPT2}/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    f"{_GPT2}/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
WHISPER = "openai-whisper==20250625"  # any version carrying whisper/assets/gpt2.tiktoken will do
EOT = 50256


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _cache_path(cache_dir, url):
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def cache_dir():
    """The folder tiktoken caches into: the user's cache folder (it survives a reboot, unlike tiktoken's own
    default in /tmp), never the checkout; sets TIKTOKEN_CACHE_DIR (inherited by worker processes) if unset."""
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    d = d or os.path.join(user_cache, "tiktoken")
    os.environ["TIKTOKEN_CACHE_DIR"] = d
    return d


def _cached(d):
    for url, sha in FILES.items():
        try:
            with open(_cache_path(d, url), "rb") as f:
                if _sha256(f.read()) != sha:
                    return False
        except OSError:
            return False
    return True


def _from_openai():
    try:
        with urllib.request.urlopen(R50K_URL, timeout=10) as r:
            return r.read()
    except OSError:  # URLError, timeouts, DNS failures
        return None


def _from_pypi():
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            WHISPER,
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            tmp,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = glob.glob(os.path.join(glob.escape(tmp), "*.tar.gz"))  # $TMPDIR may hold [ or *
        if r.returncode or not sdists:
            last = (r.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise RuntimeError(
                f"cannot get the GPT-2 vocabulary: openaipublic is unreachable and "
                f"`pip download {WHISPER}` failed ({last}); check the network and retry"
            )
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            return tar.extractfile(member).read()


def _bytes_to_unicode():
    """GPT-2's printable stand-in character for each byte, as used in vocab.bpe and encoder.json."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in bs]  # mapped to chr(256), chr(257), ... in byte order
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _data_gym_files(tiktoken_file):
    """Rebuild GPT-2's vocab.bpe and encoder.json from the ranks of r50k_base.tiktoken."""
    ranks = {}
    for line in tiktoken_file.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    by_rank = sorted(ranks, key=ranks.get)
    b2u = _bytes_to_unicode()
    u = lambda t: "".join(b2u[b] for b in t)  # noqa: E731
    encoder = {u(t): ranks[t] for t in by_rank}
    encoder["<|endoftext|>"] = EOT

    def merge_pair(token):  # replay BPE on the token with only the earlier merges: the last merge made it
        parts, r = [bytes([b]) for b in token], ranks[token]
        while len(parts) > 2:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], r), i) for i in range(len(parts) - 1))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    merges = [" ".join(map(u, merge_pair(t))) for t in by_rank[256:]]
    return "#version: 0.2\n" + "\n".join(merges) + "\n", json.dumps(encoder)


def ensure_gpt2():
    """Return tiktoken's "gpt2" Encoding, seeding its cache first if needed (see the module docstring)."""
    import tiktoken

    d = cache_dir()
    if not _cached(d):
        ranks = _from_openai()
        if ranks is None or _sha256(ranks) != FILES[R50K_URL]:
            ranks = _from_pypi()
        vocab_bpe, encoder_json = _data_gym_files(ranks)
        os.makedirs(d, exist_ok=True)
        for (url, sha), data in zip(FILES.items(), [ranks, vocab_bpe.encode(), encoder_json.encode()]):
            if _sha256(data) != sha:
                raise RuntimeError(f"GPT-2 vocabulary rebuilt from {WHISPER} does not match tiktoken's {url}")
            tmp = _cache_path(d, url) + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, _cache_path(d, url))
    enc = tiktoken.get_encoding("gpt2")
    assert enc.encode("Hello world") == [15496, 995], "tiktoken's gpt2 encoding gives wrong ids"
    return enc


if __name__ == "__main__":
    try:
        ensure_gpt2()
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    print(f"tiktoken gpt2 encoding ready (cache: {os.environ['TIKTOKEN_CACHE_DIR']})")
