"""Build the multi-domain text corpus for the embedded demo MoE (issue 6).

Every source is free to redistribute and reachable offline or through Debian's apt:
  python   the running interpreter's standard library sources, tests included (PSF-2.0)
  english  King James Bible (public domain); Debian Reference, Debian Administrator's Handbook and Debian
           New Maintainers' Guide (GPL-2+); Linux man-pages rendered to text (free licences per page)
  german   the same Debian books in German (GPL-2+), Debian's German fortunes (GPL-2+), manpages-de (GPL-3+)
  french   the same Debian books in French (GPL-2+), manpages-fr (GPL-3+)
  rst      the Python 3.11 documentation's reStructuredText sources (PSF-2.0)
Distinct domains let the experts specialise, which is what the routing demos need to show.

Requirements: python3, apt-get, dpkg-deb and groff (Debian/Ubuntu: groff-base). The Debian packages are downloaded with
`apt-get download` into --cache and unpacked there; nothing is installed.

    python tools/demo_corpus.py --cache /tmp/demo-debs --out .carry/demo/corpus

Writes <out>/<domain>.<split>.jsonl (one JSON string per document); about 5% of each domain's documents,
chosen by a stable hash, form the held-out split.
"""
from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import os
import re
import subprocess
import sysconfig
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text", "debian-reference-en", "debian-reference-de",
                   "debian-reference-fr", "debian-handbook", "fortunes-de", "maint-guide", "maint-guide-de",
                   "maint-guide-fr", "manpages", "manpages-de", "manpages-fr", "python3.11-doc")
HELDOUT_MODULUS = 20          # 1 document in 20 is held out
CHUNK_CHARS = 6000            # long flat texts are cut into documents of about this size
STDLIB_SKIP = ("site-packages", "pydoc_data", "encodings", "__pycache__")
RST_SKIP = ("whatsnew",)      # release notes: long lists of issue numbers
GROFF = ("groff", "-man", "-t", "-k", "-Tutf8", "-P-cbou", "-rLL=78n", "-rHY=0", "-dAD=l")


@dataclass(frozen=True)
class Source:
    domain: str
    name: str
    licence: str
    documents: Callable[[Path], Iterator[str]]


def fetch_debian_packages(cache: Path) -> Path:
    """Download and unpack the Debian packages into cache/root (no installation, no root needed)."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


FUNCTION_WORDS = {
    "english": {"the", "and", "of", "to", "is", "that", "with", "it", "you", "this", "are", "for"},
    "german": {"der", "die", "das", "und", "ist", "nicht", "mit", "sie", "ein", "eine", "auf", "für"},
    "french": {"le", "la", "les", "et", "est", "des", "une", "pour", "dans", "que", "vous", "sur"},
}


def foreign(para: str, language: str | None) -> bool:
    """True for a paragraph a partial translation left in English (counted by function words)."""
    if language is None:
        return False
    words = re.findall(r"[a-zäöüéèêàç]+", para.lower())
    return sum(w in FUNCTION_WORDS["english"] for w in words) > sum(w in FUNCTION_WORDS[language] for w in words)


def chunks(text: str, language: str | None = None) -> Iterator[str]:
    """Cut a long text at paragraph boundaries into documents of about CHUNK_CHARS, dropping paragraphs
    of another language than `language` (None keeps all)."""
    buf: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip() or foreign(para, language):
            continue
        buf.append(para)
        size += len(para)
        if size >= CHUNK_CHARS:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


class _HtmlText(html.parser.HTMLParser):
    """Visible text of a DocBook HTML page, one line per block element."""
    BLOCKS = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "tr", "pre", "dt", "dd", "br", "table"}
    SKIP = {"script", "style", "head", "title"}
    CONTAINERS = {"div", "ul"}
    NAVIGATION = {"docnav", "toc", "navheader", "navfooter"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0
        self.containers: list[bool] = []   # open div/ul elements: True where navigation is skipped

    def handle_starttag(self, tag, attrs):
        if tag in self.CONTAINERS:
            a = dict(attrs)
            nav = a.get("id") == "banner" or bool(self.NAVIGATION & set((a.get("class") or "").split()))
            self.containers.append(nav)
            self.skip_depth += nav
        if tag in self.SKIP:
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "h5") else "\n")

    def handle_endtag(self, tag):
        if tag in self.CONTAINERS and self.containers:
            self.skip_depth -= self.containers.pop()
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(line if line.strip() else "" for line in lines)).strip()


def html_pages(folder: str, language: str | None = None) -> Callable[[Path], Iterator[str]]:
    def documents(root: Path) -> Iterator[str]:
        for page in sorted((root / folder).glob("*.html")):
            parser = _HtmlText()
            parser.feed(page.read_text(encoding="utf-8", errors="replace"))
            text = parser.text()
            if len(text) > 200:
                yield from chunks(text, language)
    return documents


def gzip_text(path: str) -> Callable[[Path], Iterator[str]]:
    def documents(root: Path) -> Iterator[str]:
        yield from chunks(gzip.decompress((root / path).read_bytes()).decode("utf-8", errors="replace"))
    return documents


def kjv_chapters(root: Path) -> Iterator[str]:
    """The whole King James Bible through the packaged `bible` reader, one document per chapter."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f", "Gen1:1-Rev22:21"],
                         check=True, capture_output=True, text=True).stdout
    chapter, verses = None, []
    for line in out.splitlines():
        m = re.match(r"^(\S+?):\d+ (.*)$", line)  # "1Sa3:4 text": chapter "1Sa3"
        if m is None:
            continue
        if m.group(1) != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = m.group(1)
        verses.append(m.group(2))
    if verses:
        yield "\n".join(verses)


def german_fortunes(root: Path) -> Iterator[str]:
    folder = root / "usr/share/games/fortunes/de"
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():
            continue
        cookies = [c.strip("\n") for c in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        yield from chunks("\n\n".join(c for c in cookies if c.strip()))


def stdlib_files(_: Path) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in STDLIB_SKIP for part in path.relative_to(stdlib).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if 200 < len(text) < 400_000:
            yield text


def man_pages(folder: str) -> Callable[[Path], Iterator[str]]:
    """Manual pages of sections 1-8 under folder, rendered to plain text by groff, one document each."""
    def render(page: Path) -> str:
        roff = gzip.decompress(page.read_bytes())
        return subprocess.run(GROFF, input=roff, capture_output=True, check=False).stdout.decode("utf-8", "replace")

    def documents(root: Path) -> Iterator[str]:
        pages = sorted(p for p in (root / folder).glob("man[1-8]/*.gz") if not p.is_symlink())
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            for text in pool.map(render, pages):
                text = re.sub(r"\n{3,}", "\n\n", text.strip())
                if len(text) > 200:
                    yield from chunks(text) if len(text) > 4 * CHUNK_CHARS else [text]
    return documents


def rst_sources(root: Path) -> Iterator[str]:
    folder = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(folder.rglob("*.rst.txt")):
        if not any(part in RST_SKIP for part in path.relative_to(folder).parts):
            yield from chunks(path.read_text(encoding="utf-8", errors="replace"))


SOURCES = (
    Source("python", "Python standard library sources", "PSF-2.0", stdlib_files),
    Source("english", "King James Bible (Debian bible-kjv-text)", "public domain", kjv_chapters),
    Source("english", "Debian Reference (en)", "GPL-2+", gzip_text("usr/share/debian-reference/debian-reference.en.txt.gz")),
    Source("english", "Debian New Maintainers' Guide (en)", "GPL-2+", gzip_text("usr/share/doc/maint-guide/maint-guide.en.txt.gz")),
    Source("english", "Linux man-pages (Debian manpages), rendered", "free licences per page (Debian main)",
           man_pages("usr/share/man")),
    Source("english", "Debian Administrator's Handbook (en-US)", "GPL-2+ or CC-BY-SA-3.0",
           html_pages("usr/share/doc/debian-handbook/html/en-US")),
    Source("german", "Debian Reference (de)", "GPL-2+", gzip_text("usr/share/debian-reference/debian-reference.de.txt.gz")),
    Source("german", "Debian Administrator's Handbook (de-DE)", "GPL-2+ or CC-BY-SA-3.0",
           html_pages("usr/share/doc/debian-handbook/html/de-DE", "german")),
    Source("german", "German fortunes (Debian fortunes-de)", "GPL-2+", german_fortunes),
    Source("german", "Debian New Maintainers' Guide (de)", "GPL-2+", gzip_text("usr/share/doc/maint-guide-de/maint-guide.de.txt.gz")),
    Source("german", "German manual pages (Debian manpages-de), rendered", "GPL-3+", man_pages("usr/share/man/de")),
    Source("french", "Debian Reference (fr)", "GPL-2+", gzip_text("usr/share/debian-reference/debian-reference.fr.txt.gz")),
    Source("french", "Debian Administrator's Handbook (fr-FR)", "GPL-2+ or CC-BY-SA-3.0",
           html_pages("usr/share/doc/debian-handbook/html/fr-FR", "french")),
    Source("french", "Debian New Maintainers' Guide (fr)", "GPL-2+", gzip_text("usr/share/doc/maint-guide-fr/maint-guide.fr.txt.gz")),
    Source("french", "French manual pages (Debian manpages-fr), rendered", "GPL-3+", man_pages("usr/share/man/fr")),
    Source("rst", "Python 3.11 documentation sources, reStructuredText (Debian python3.11-doc)", "PSF-2.0",
           rst_sources),
)
DOMAINS = tuple(dict.fromkeys(s.domain for s in SOURCES))


def is_heldout(source: Source, index: int) -> bool:
    return zlib.crc32(f"{source.name}/{index}".encode()) % HELDOUT_MODULUS == 0


def build(root: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {(d, s): (out / f"{d}.{s}.jsonl").open("w", encoding="utf-8")
             for d in DOMAINS for s in ("train", "heldout")}
    stats: dict = {}
    for source in SOURCES:
        row = stats.setdefault(source.name, {"domain": source.domain, "licence": source.licence,
                                             "documents": 0, "chars": 0, "heldout_documents": 0})
        for i, doc in enumerate(source.documents(root)):
            split = "heldout" if is_heldout(source, i) else "train"
            files[source.domain, split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            row["documents"] += 1
            row["chars"] += len(doc)
            row["heldout_documents"] += split == "heldout"
    for f in files.values():
        f.close()
    (out / "sources.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="where Debian packages are downloaded")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stats = build(fetch_debian_packages(args.cache), args.out)
    for name, row in stats.items():
        print(f"{row['domain']:8} {row['documents']:6} docs {row['chars'] / 1e6:7.2f} M chars  {name} ({row['licence']})")


if __name__ == "__main__":
    main()
