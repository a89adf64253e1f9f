"""Ollama-style Hugging Face sources: `hf.co/OWNER/REPO[:QUANT]` resolved to one pinned GGUF.

`parse_hf_ref` reads the reference (`huggingface.co/` too; no quant, or `:latest`, means Q4_K_M, as
in the Hub's "Use Ollama with any GGUF Model" guide, docs/hub/ollama.md, else the repo's only GGUF).
`resolve` lists the repo with the Hub API, on `endpoint` only (a redirect or next page to another
origin is refused), and turns the chosen file into a `CatalogueEntry` the installer checks like
any other. What this relies on, from huggingface_hub's `HfApi.list_repo_tree`, `RepoFile` and
`utils/_pagination.paginate`:
- `GET {endpoint}/api/models/{owner}/{repo}/tree/{revision}?recursive=true` answers a JSON list of
  `{"type": "file"|"directory", "path", "size", "oid", "lfs"?}`, pages chained by a `Link` header
  with `rel="next"` (a full URL with its query);
- a Git LFS file has `lfs: {"oid", "size", "pointerSize"}`, and that `oid` is the file's SHA-256
  (`BlobLfsInfo.sha256`), so it is the pin; a file without it has no hash the Hub vouches for and
  is refused;
- files download from `{endpoint}/{owner}/{repo}/resolve/{revision}/{path}`;
- the Hub answers 401 for a private or gated repo and also for one that does not exist.
Owner and repo follow huggingface_hub's `validate_repo_id`: letters, digits, `-_.`, 1 to 96
characters, no leading or trailing `-`/`.`, no `--` or `..`, not ending in `.git`.

Choosing the file: among the `.gguf` files that are not `mmproj*` (vision projectors), the quant
must appear in the file's name (without `.gguf`) as a whole token, ignoring case. Tokens are cut
at `-`, `.` and the ends of the name; `_` joins the parts of a quant and never cuts, so `Q4_K` does
not match `Q4_K_M`, nor `Q4_K_M` match `Q4_K_M_XL`, while `Q4_K_XL` matches `...-UD-Q4_K_XL.gguf`.
Several matches: the fewest folders deep, then the shortest path, then the first by name. A GGUF
split into parts (`-00001-of-00003.gguf`) is refused: the store holds single files.

Vision: when the repo holds `mmproj*` GGUFs (llama.cpp's vision projectors), one is installed
beside the model as its projector, pinned to its own LFS SHA-256: the first by precision named
after `mmproj` (F16, then BF16, Q8_0, F32, as whole tokens, ignoring case; then any), then the
fewest folders deep, the shortest path and the first by name. Projectors without an LFS pin, and
split ones, are never chosen.

Naming: family is the repo name less a `-GGUF` suffix, lowercased, with any character a name
cannot hold turned into `-` (`names.name_for_file`); tag is the quant lowercased (for a repo's
only GGUF taken without a quant, the quant its file name shows, else `latest`). So
`hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0` installs as `llama-3.2-1b-instruct:q8_0`. The
purpose is the one the verified file's GGUF header gives (the installer reads it before it
writes the sidecar, for any entry marked `purpose_from_header`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlparse

import httpx

from pendra_shared.catalogue import CatalogueEntry, is_sha256
from pendra_shared.errors import (
    InvalidModelName,
    ModelNotFound,
    PendraError,
    SourceRefused,
    TransientDownloadError,
)
from pendra_shared.names import name_for_file

logger = logging.getLogger(__name__)

HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"
DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_PAGES = 100
PROJECTOR_PRECISIONS = ("F16", "BF16", "Q8_0", "F32")  # preferred, in order
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_QUANT = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_][A-Za-z0-9]+)*")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_GGUF_SUFFIX = re.compile(r"[-_.]gguf$", re.IGNORECASE)
# Quants as llama.cpp and the big uploaders name them; only for messages and for naming the one
# GGUF of a repo picked without a quant.
_KNOWN_QUANT = re.compile(
    r"(?:^|(?<=[-.]))((?:UD-)?(?:I?Q\d[A-Z0-9]*(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_MOE)?|BF16|F16|F32))(?=$|[-.])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class HFRef:
    """A Hugging Face GGUF reference; `quant` None means Q4_K_M (or the repo's only GGUF)."""

    owner: str
    repo: str
    quant: str | None = None
    revision: str = "main"

    @property
    def source(self) -> str:
        return f"hf.co/{self.owner}/{self.repo}"

    def __str__(self) -> str:
        return self.source if self.quant is None else f"{self.source}:{self.quant}"


def parse_hf_ref(text: str) -> HFRef | None:
    """`hf.co/OWNER/REPO[:QUANT]` (or `huggingface.co/...`) parsed; None for any other text."""
    host, slash, rest = text.partition("/")
    if not slash or host.lower() not in HOSTS:
        return None
    path, colon, quant = rest.partition(":")
    parts = path.split("/")
    if len(parts) != 2:
        raise InvalidModelName(f"invalid Hugging Face reference {text!r}: expected hf.co/OWNER/REPO[:QUANT]")
    for part in parts:
        bad = "--" in part or ".." in part or part.endswith(".git")
        if _REPO_PART.fullmatch(part) is None or bad:
            raise InvalidModelName(
                f"invalid Hugging Face reference {text!r}: {part!r} is not a repo or owner name "
                "(letters, digits and -_. only, 1 to 96 characters, no leading or trailing - or ., "
                "no -- or .., not ending in .git)"
            )
    if colon and (len(quant) > 32 or _QUANT.fullmatch(quant) is None):
        raise InvalidModelName(
            f"invalid Hugging Face reference {text!r}: {quant!r} is not a quantization "
            "such as Q4_K_M, q8_0, IQ2_XXS, BF16 or UD-Q4_K_XL"
        )
    return HFRef(parts[0], parts[1], None if not colon or quant.lower() == "latest" else quant)


def resolve(
    ref: HFRef,
    endpoint: str = DEFAULT_ENDPOINT,
    client: httpx.Client | None = None,
    timeout_s: float = 30,
) -> CatalogueEntry:
    """The catalogue entry for `ref`: one single-file GGUF of the repo, pinned to its LFS SHA-256."""
    endpoint = endpoint.rstrip("/")
    origin = urlparse(endpoint)[:2]

    def same_origin(request: httpx.Request) -> None:
        # Checked before each request is sent, redirects included: nothing leaves the endpoint.
        if (request.url.scheme, request.url.netloc.decode()) != origin:
            raise SourceRefused(f"{ref}: the Hugging Face API at {endpoint} redirected to {request.url.host}")

    own = client is None
    http = client or httpx.Client(
        timeout=timeout_s, follow_redirects=True, event_hooks={"request": [same_origin]}
    )
    try:
        files = _list_files(ref, endpoint, http)
    finally:
        if own:
            http.close()
    path, quant = _choose(ref, files)
    pin = _lfs_pin(files[path])
    if pin is None:
        raise SourceRefused(
            f"{ref}: {path} is not a Git LFS file with a SHA-256 and size, so nothing pins its bytes; "
            "Pendra installs pinned files only"
        )
    projector = _choose_projector(ref, files)
    stem = _GGUF_SUFFIX.sub("", ref.repo)
    family = name_for_file(f"{stem}.gguf") or name_for_file(f"{ref.repo}.gguf") or "hf"
    revision = quote(ref.revision, safe="")

    def url(file: str) -> str:
        quoted = "/".join(quote(segment, safe="") for segment in file.split("/"))
        return f"{endpoint}/{ref.owner}/{ref.repo}/resolve/{revision}/{quoted}"

    projector_pin = _lfs_pin(files[projector]) if projector else None
    return CatalogueEntry(
        name=f"{family}:{quant.lower() if quant else 'latest'}",
        purpose="chat",  # until the file is verified: then its header says (purpose_from_header)
        purpose_from_header=True,
        gguf_url=url(path),
        gguf_sha256=pin[0],
        size_bytes=pin[1],
        mmproj_url=url(projector) if projector else None,
        mmproj_sha256=projector_pin[0] if projector_pin else None,
        mmproj_size_bytes=projector_pin[1] if projector_pin else None,
        quantization=quant.upper() if quant else None,
        description=f"{path} from Hugging Face repo {ref.owner}/{ref.repo} ({ref.revision})",
        source=ref.source,
        allow_private=False,
    )


def _list_files(ref: HFRef, endpoint: str, http: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every file of the repo at its revision, by path, following the `Link` pages on `endpoint`."""
    url: str | None = f"{endpoint}/api/models/{ref.owner}/{ref.repo}/tree/{quote(ref.revision, safe='')}"
    params: dict[str, str] | None = {"recursive": "true"}
    origin = urlparse(endpoint)[:2]
    files: dict[str, dict[str, Any]] = {}
    for page in range(MAX_PAGES + 1):
        if url is None:
            return files
        if page == MAX_PAGES:
            raise SourceRefused(f"{ref}: the file list runs past {MAX_PAGES} pages")
        try:
            response = http.get(url, params=params, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TransientDownloadError(
                f"{ref}: cannot reach the Hugging Face API at {endpoint}: {exc}"
            ) from None
        _check_status(ref, response)
        try:
            items = response.json()
        except ValueError:
            items = None
        if not isinstance(items, list) or urlparse(str(response.url))[:2] != origin:
            raise SourceRefused(f"{ref}: the Hugging Face API at {endpoint} gave an unexpected answer")
        for item in items:
            if isinstance(item, dict) and item.get("type") == "file" and isinstance(item.get("path"), str):
                files[item["path"]] = item
        url, params = response.links.get("next", {}).get("url"), None
        if url is not None and urlparse(url)[:2] != origin:
            raise SourceRefused(f"{ref}: the Hugging Face API's next page is not on {endpoint}")
    return files


def _lfs_pin(item: dict[str, Any]) -> tuple[str, int] | None:
    """The (SHA-256, size) the Hub's LFS record gives a file; None where it gives none."""
    lfs = item.get("lfs")
    oid, size = (lfs.get("oid"), lfs.get("size")) if isinstance(lfs, dict) else ("", 0)
    if not is_sha256(oid) or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return None
    return str(oid), size


def _is_projector(path: str) -> bool:
    return path.lower().endswith(".gguf") and _base(path).lower().startswith("mmproj")


def _choose_projector(ref: HFRef, files: dict[str, dict[str, Any]]) -> str | None:
    """The path of the vision projector to install with the model, or None (see the module)."""
    found = [p for p in files if _is_projector(p) and not _SPLIT.search(p)]
    pinned = [p for p in found if _lfs_pin(files[p]) is not None]
    if found and not pinned:
        logger.warning("%s: its projectors (%s) have no LFS pin; installing without one", ref, found[0])

    def rank(path: str) -> int:
        after = _base(path)[len("mmproj") : -len(".gguf")]
        for index, precision in enumerate(PROJECTOR_PRECISIONS):
            if re.search(rf"(?:^|(?<=[-._])){precision}(?=$|[-.])", after, re.IGNORECASE):
                return index
        return len(PROJECTOR_PRECISIONS)

    return min(pinned, key=lambda p: (rank(p), p.count("/"), len(p), p), default=None)


def _check_status(ref: HFRef, response: httpx.Response) -> None:
    status = response.status_code
    if status == 404 and response.headers.get("X-Error-Code") == "RevisionNotFound":
        raise ModelNotFound(f"{ref}: the Hugging Face repo has no revision {ref.revision!r}")
    if status == 404:
        raise ModelNotFound(f"{ref}: no such Hugging Face repo")
    if status in (401, 403):
        raise SourceRefused(
            f"{ref}: the Hugging Face repo is gated or private (HTTP {status}; the Hub answers 401 "
            "for a repo that does not exist too); Pendra installs from public repos only"
        )
    if status >= 500 or status == 429:
        raise TransientDownloadError(f"{ref}: the Hugging Face API answered HTTP {status}; try again later")
    if status != 200:
        raise PendraError(f"{ref}: the Hugging Face API answered HTTP {status}")


def _choose(ref: HFRef, files: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """The path of the GGUF to install and its quant (None when it names none)."""
    ggufs = sorted(p for p in files if p.lower().endswith(".gguf") and not _is_projector(p))
    quant = ref.quant or DEFAULT_QUANT
    token = re.compile(rf"(?:^|(?<=[-.])){re.escape(quant)}(?=$|[-.])", re.IGNORECASE)
    matches = [p for p in ggufs if token.search(_base(p)[: -len(".gguf")])]
    if not matches and ref.quant is None and len(ggufs) == 1:
        matches = ggufs
        quant = _quant_of(ggufs[0]) or ""
    whole = [p for p in matches if not _SPLIT.search(p)]
    if matches and not whole:
        raise ModelNotFound(
            f"{ref}: {quant or matches[0]} is split into {len(matches)} files ({matches[0]}, ...); "
            "Pendra installs single-file GGUFs only"
        )
    if not whole:
        quants = sorted({_quant_of(p) or _base(p) for p in ggufs})
        listed = f"; it has: {', '.join(quants)}" if quants else "; it has no GGUF files"
        raise ModelNotFound(f"{ref}: no {quant} GGUF in the Hugging Face repo{listed}")
    best = min(whole, key=lambda p: (p.count("/"), len(p), p))
    return best, quant or None


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _quant_of(path: str) -> str | None:
    """The last known quant named in the file's name, uppercased; None when it names none."""
    found = _KNOWN_QUANT.findall(_base(path)[: -len(".gguf")])
    return found[-1].upper() if found and len(found[-1]) <= 32 else None
