"""Paths for everything a run reads or writes: a local path or a `gs://` URL, one type.

`path()` gives an `etils.epath.Path` (the type Orbax uses): local paths are made absolute,
URLs never are (`os.path.abspath("gs://b/r")` would be `<cwd>/gs:/b/r`). The helpers here
sit below every module that touches storage (checkpoint, data preparation, metrics, EWC
files, `workdir`), so none of them imports another to reach a file.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import posixpath
import re
import sys

from etils import epath

SCHEMES = ("gs",)
# gcsfs warns on every bucket it opens without credentials (an emulator, a public bucket).
logging.getLogger("gcsfs").setLevel(logging.ERROR)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def path(p) -> epath.Path:
  """A local path (made absolute) or a gs:// URL as an epath.Path; other schemes are an error.
  A URL's `.` and `..` parts are resolved as a local path's are (object storage has no folders to
  resolve them: `gs://b/glue/MNLI/../diagnostic` would name an object under `MNLI/..`)."""
  s = os.fspath(p) if not isinstance(p, epath.Path) else str(p)
  if m := _URL.match(s):
    if m.group(1) not in SCHEMES:
      raise ValueError(f"{s}: the URL scheme {m.group(1)}:// is not supported; use a local path or "
                       f"gs://bucket/path")
    rest = s[m.end():]
    if "/." in rest:
      rest = posixpath.normpath(rest)
    return epath.Path(f"{m.group(1)}://{rest}")
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(p) -> bool:
  return bool(_URL.match(os.fspath(p) if not isinstance(p, epath.Path) else str(p)))


def access_error(url, e: BaseException) -> ValueError:
  """One line for a gs:// location that cannot be reached or has no credentials."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  return ValueError(
      f"cannot access {url} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
      f"check the bucket name and set credentials: GOOGLE_APPLICATION_CREDENTIALS=key.json or "
      f"`gcloud auth application-default login` (on a Cloud TPU VM the VM's service account needs "
      f"storage access)" + (f"; STORAGE_EMULATOR_HOST={emulator} is set" if emulator else ""))


_REACHABLE: set[str] = set()


def check_bucket(url) -> None:
  """For a gs:// URL, check once per process that its bucket exists and answers with the credentials
  at hand; otherwise raise `access_error` (one line naming the URL and what to set). Local paths
  pass. Entry points call it so a bad bucket is not a traceback deep inside gcsfs or TensorStore."""
  if not is_remote(url):
    return
  s = str(url) if isinstance(url, epath.Path) else os.fspath(url)
  path(s)  # an unknown scheme: its own one line
  bucket = s.split("://", 1)[1].split("/", 1)[0]
  if not bucket:
    raise ValueError(f"{s}: no bucket name; use gs://bucket/path")
  if bucket in _REACHABLE:
    return
  try:
    found = epath.Path(f"gs://{bucket}").exists()
  except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise their own types)
    raise access_error(s, e) from e
  if not found:
    raise access_error(s, FileNotFoundError(f"bucket {bucket} does not exist or is not visible"))
  _REACHABLE.add(bucket)


def check_bucket_or_exit(url) -> None:
  """`check_bucket` for a command-line tool's flag: a bad URL or an unreachable bucket prints one
  `error:` line and exits with status 2, before any work. An empty value (flag unset) passes."""
  if not url:
    return
  try:
    check_bucket(url)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _remote_call(p, fn):
  """fn() for a path `p`; for gs:// the bucket is checked first (`check_bucket`) and a failure other
  than a missing file is `access_error` (one line naming the URL and what to set)."""
  if not is_remote(p):
    return fn()
  check_bucket(p)
  try:
    return fn()
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise their own types)
    raise access_error(p, e) from e


def is_file(p) -> bool:
  """Whether `p` (a local path or gs:// URL) is a file. Input readers test their files with this,
  so a gs:// data folder works wherever a local one does."""
  return _remote_call(p, lambda: path(p).is_file())


def is_dir(p) -> bool:
  """Whether `p` (a local path or gs:// URL) is a folder."""
  return _remote_call(p, lambda: path(p).is_dir())


def read_bytes(p) -> bytes:
  """The content of a local or gs:// file (FileNotFoundError when it is absent)."""
  return _remote_call(p, lambda: path(p).read_bytes())


def read_text(p, encoding: str = "utf-8") -> str:
  """A local or gs:// file decoded (UnicodeDecodeError on a bad byte, as `open` would)."""
  return read_bytes(p).decode(encoding)


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a glob, local (`glob.glob`, relative patterns stay relative) or gs://
  (`gs://bucket/cnndm/*.train.*.json`: matched under the bucket); folders included."""
  if not is_remote(pattern):
    return sorted(globlib.glob(pattern))
  scheme_and_rest = str(path(pattern))  # an unknown scheme: its own one line
  scheme, _, rest = scheme_and_rest.partition("://")
  bucket, _, glob_part = rest.partition("/")
  return sorted(_remote_call(pattern, lambda: [str(m) for m in path(f"{scheme}://{bucket}").glob(glob_part)]))


def write_text_atomic(p, text: str) -> None:
  """Write a whole file so a reader never sees half of it: locally a temporary file renamed over
  it; on gs:// one object upload (an object appears only once its upload completes)."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)
    return
  tmp = p.with_name(p.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(p)


def write_figure(fig, p, dpi: int) -> str:
  """A matplotlib figure as a PNG at `p` (local or gs://: rendered in memory, written through epath);
  the figure is closed. Returns the path as a string."""
  import io

  import matplotlib.pyplot as plt
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=dpi)
  plt.close(fig)
  out = path(p)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(png.getvalue())
  return str(out)


def copy_tree(src, dst, last: str | None = None) -> None:
  """Copy a directory tree between any two epath locations; the file named `last` goes last."""
  dst.mkdir(parents=True, exist_ok=True)
  deferred = None
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    elif child.name == last:
      deferred = child
    else:
      child.copy(dst / child.name, overwrite=True)
  if deferred is not None:
    deferred.copy(dst / deferred.name, overwrite=True)


class _RewriteOnFlush:
  """Append-mode file on object storage (GCS objects cannot be appended to): keeps the content
  and rewrites the object on each flush. For small logs (metrics.jsonl, event files)."""

  def __init__(self, p: epath.Path, binary: bool):
    self._path, self._binary = p, binary
    self._chunks = [p.read_bytes() if binary else p.read_text()] if p.exists() else []
    self._dirty = False

  def write(self, data):
    self._chunks.append(data)
    self._dirty = True
    return len(data)

  def flush(self):
    if self._dirty:
      empty = b"" if self._binary else ""
      content = empty.join(self._chunks)
      self._chunks = [content]
      (self._path.write_bytes if self._binary else self._path.write_text)(content)
      self._dirty = False

  def close(self):
    self.flush()


def open_append(p, binary: bool = False):
  """A file opened for appending, local or gs:// (parent folders created)."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    return _RewriteOnFlush(p, binary)
  return open(p, "ab" if binary else "a")
