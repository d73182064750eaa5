"""Released weights by name: download (resumable, hash-checked), convert once, cache.

    model, variables = jvit.pretrained.load("hvt_s_1")
    logits = model.apply(variables, images_nhwc)

Files go to ``$JVIT_CACHE`` (default ``~/.cache/jvit``): ``downloads/<file>`` holds the released
PyTorch file (``<file>.part`` while incomplete; a rerun resumes it with an HTTP ``Range`` request),
``converted/<name>-<img_size>-<file>/`` the converted orbax directory (:func:`jvit.checkpoint.save_variables`),
so a second ``load`` reads neither the network nor torch. The registry's ``sha256`` is checked when
a source states one; the original authors publish none, so for the official variants it is ``None``
and downloads are not verified. Releases that need a browser (Google-Drive folders, a release page
without file links) raise :class:`ManualDownloadRequired` saying where to get the file and to pass
``weights=PATH``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import flax.linen as nn

from jvit import checkpoint, registry

_CHUNK = 1 << 20


class ManualDownloadRequired(FileNotFoundError):
    """The weights must be fetched by hand (with a browser); the message says where and what to pass."""


def resolve_cache_dir(path: str | os.PathLike | None = None) -> str:
    """The cache root: ``path`` if given, else ``$JVIT_CACHE``, else ``~/.cache/jvit``."""
    root = path or os.environ.get("JVIT_CACHE") or os.path.join("~", ".cache", "jvit")
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def is_url(text: str) -> bool:
    """Whether ``text`` is an ``http(s)://`` or ``file://`` URL."""
    return urllib.parse.urlparse(text).scheme in ("http", "https", "file")


def download(url: str, directory: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> str:
    """Fetch ``url`` into ``directory/<file name of the URL>`` and return that path.

    An existing complete file is reused (after the hash check). An interrupted download leaves
    ``<file>.part``; the next call asks the server for the remaining bytes (``Range``) and appends
    them, or starts over if the server ignores the request. With ``sha256`` the finished file is
    hashed; a mismatch deletes it (a retry downloads afresh) and raises ``ValueError``.
    """
    name = _file_name(url)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), name)
    if not os.path.isfile(path):
        part = path + ".part"
        _fetch(url, part, progress)
        os.replace(part, path)
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256.lower():
            os.remove(path)
            raise ValueError(
                f"{url}: sha256 {digest} does not match the expected {sha256}; the file was deleted, "
                f"retry the download (or check the registry's hash)"
            )
    return path


def _file_name(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"{url}: the URL names no file")
    return name


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, part: str, progress: bool) -> None:
    """Append ``url``'s bytes after those already in ``part`` (the whole file if the server
    answers a ``Range`` request with 200)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "jvit"})
    if have and url.startswith("file:"):
        # urllib's file handler ignores Range: open the file and seek instead (closed by the `with` below).
        local = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        response = open(local, "rb")  # noqa: SIM115
        response.seek(have)
        total, resumed = os.fstat(response.fileno()).st_size, True
    else:
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 416:  # 416: the part already holds every byte
                raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
            return
        except urllib.error.URLError as e:
            raise OSError(f"{url}: {e.reason}") from e
        resumed = getattr(response, "status", 200) == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
    if not resumed:
        have = 0
    label = os.path.basename(part)[: -len(".part")]
    with response, open(part, "ab" if resumed else "wb") as out:
        done, last = have, 0.0
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            done += len(chunk)
            if progress and time.monotonic() - last > 0.5:
                _show(label, done, total, resumed and have)
                last = time.monotonic()
    if progress:
        _show(label, done, total, resumed and have)
        print(file=sys.stderr)
    if total is not None and done != total:
        raise OSError(f"{url}: got {done} of {total} bytes; run again to resume")


def _show(label: str, done: int, total: int | None, resumed_from: int) -> None:
    size = (
        f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB ({100 * done / max(total, 1):.0f}%)"
        if total
        else f"{done / 2**20:.1f} MiB"
    )
    note = f", resumed at {resumed_from / 2**20:.1f} MiB" if resumed_from else ""
    print(f"\rdownloading {label}: {size}{note}", end="", file=sys.stderr, flush=True)


def load(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    img_size: int | None = None,
    weights: str | os.PathLike | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` of the registered variant ``name`` with its released weights.

    Args:
      name: a registered variant, e.g. ``"hvt_s_1"``.
      cache_dir: cache root (default :func:`resolve_cache_dir`: ``$JVIT_CACHE`` or ``~/.cache/jvit``).
      img_size: an official resolution of the variant (default: its first).
      weights: instead of the registry's URLs: a released file (``.pth``/``.pth.tar``), a URL to
        one, or a jvit directory (converted, a ``jvit.main`` run or one of its steps).

    Raises :class:`ManualDownloadRequired` when the release needs a browser and no ``weights`` is given.
    """
    cfg = registry.get_pretrained_cfg(name, img_size)
    root = resolve_cache_dir(cache_dir)
    if weights is not None and not is_url(os.fspath(weights)):
        path = os.path.expanduser(os.fspath(weights))
        if os.path.isdir(path):
            variables, meta = checkpoint.load_variables(path)
            if meta["model"] != name:
                raise ValueError(f"{path} holds {meta['model']!r} weights, not {name!r}")
            return checkpoint.create_model(meta), variables
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights={weights!r}: no such file or directory")
        return _convert(path, name, cfg.img_size, None)
    urls = (os.fspath(weights),) if weights is not None else cfg.urls
    if not urls:
        raise ManualDownloadRequired(_manual_message(name, cfg))
    # Keyed by the file too, so weights from another URL never reuse the registry release's conversion.
    converted = os.path.join(root, "converted", f"{name}-{cfg.img_size}-{_file_name(urls[0])}")
    if os.path.isdir(converted):
        variables, meta = checkpoint.load_variables(converted)
        return checkpoint.create_model(meta), variables
    errors = []
    for url in urls:
        try:
            path = download(url, os.path.join(root, "downloads"), cfg.sha256 if weights is None else None)
            break
        except OSError as e:  # an unreachable mirror: try the next URL
            errors.append(str(e))
    else:
        raise OSError(f"could not download {name}: {'; '.join(errors)}. {_manual_message(name, cfg)}")
    return _convert(path, name, cfg.img_size, converted)


def _convert(path: str, name: str, img_size: int, cache: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Convert a released file; with ``cache``, store the result there (written beside it, then
    renamed, so an interrupted conversion never leaves a half directory that looks finished)."""
    import jvit.convert  # needs torch; only when a file is actually converted

    print(f"converting {path} for {name} ...", file=sys.stderr, flush=True)
    variables, report = jvit.convert.convert_checkpoint(path, name, img_size=img_size)
    head = report.num_classes
    meta = {"model": name, "num_classes": head, "img_size": img_size, "source": path, "weights_key": report.weights_key}
    if cache is not None:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".converting-")
        checkpoint.save_variables(os.path.join(tmp, "out"), variables, meta)
        os.replace(os.path.join(tmp, "out"), cache)
        shutil.rmtree(tmp)
    return registry.create_model(name, num_classes=head, img_size=img_size), variables


def _manual_message(name: str, cfg: registry.PretrainedCfg) -> str:
    where = cfg.manual_download or "the original authors released no weights for this variant"
    return (
        f"{name} ({cfg.img_size} px) cannot be downloaded automatically: {where}. Then pass the file: "
        f"jvit.pretrained.load({name!r}, weights=PATH) or `jvit predict --model {name} --weights PATH`."
    )
