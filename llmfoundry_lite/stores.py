"""Object stores (`s3://`, `gs://`, `oci://`, `azure://`): the one place this project reaches a bucket.

Composer's object-store clients (the ones its checkpointing uses; streaming's downloads go through
the same boto3) move the bytes. This module adds what a run needs around them:
- errors that name the URI and what failed, and a quick client (short timeouts, no retry loop) for
  the pre-flight, so a wrong endpoint, bucket or key is a one-line error within seconds;
- prefixes: list, download and upload a folder, the files that make it usable last (`upload_folder`'s
  `last`), and deletion (checkpoint rotation);
- `localize`: what a command reads from a store (a model folder, a checkpoint) downloaded whole into
  a cache folder, then opened like a local one, through the same checks.

S3-compatible stores (AWS S3, MinIO, Cloudflare R2: `S3_ENDPOINT_URL`, the usual AWS credentials) are
what the tests exercise against a real server. `gs://`, `oci://` and `azure://` go through Composer's
GCS, OCI and libcloud clients; streaming brings the GCS and OCI ones, the `azure` extra libcloud.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlparse

from llmfoundry_lite.errors import StoreError, UserError
from llmfoundry_lite.files import MANIFEST, STAGING, _inside, _refusal

# scheme -> (module its client needs, the extra that installs it), or None: installed with the package
# (boto3; google-cloud-storage and oci come with streaming).
SCHEMES: Dict[str, Optional[Tuple[str, str]]] = {"s3": None, "gs": None, "oci": None, "azure": ("libcloud", "azure")}
# The pre-flight's client: a few seconds to connect or answer, one retry, then an error.
QUICK = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}}


def is_remote(path) -> bool:
    """Whether `path` is a URI with a scheme (`s3://...`); a local path has none."""
    return isinstance(path, str) and "://" in path


def split(uri: str) -> Tuple[str, str, str]:
    """(scheme, bucket, key) of `uri`; the key has no leading or trailing slash."""
    parsed = urlparse(uri)
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *(n.strip("/") for n in names if n)])


def cache_root() -> str:
    """Where downloads and checkpoint staging live: $LLMFOUNDRY_LITE_CACHE or ~/.cache/llmfoundry_lite."""
    return os.environ.get("LLMFOUNDRY_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "llmfoundry_lite")


def local_mirror(uri: str, kind: str) -> str:
    """The cache folder for `uri` (`kind`: downloads, staging): the same path on every rank and node."""
    scheme, bucket, key = split(uri)
    return os.path.join(cache_root(), kind, scheme, bucket, *key.split("/"))


def scheme_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot be reached from here (an unknown scheme, a missing extra), or None."""
    scheme, bucket, _ = split(uri)
    if scheme not in SCHEMES:
        return f"{uri}: unknown scheme {scheme}:// (object stores: {', '.join(s + '://' for s in SCHEMES)})"
    if not bucket:
        return f"{uri}: no bucket name (write {scheme}://BUCKET/PATH)"
    need = SCHEMES[scheme]
    if need and importlib.util.find_spec(need[0].split(".")[0]) is None:
        return f"{uri}: {scheme}:// needs the {need[1]} extra: pip install 'llmfoundry-lite[{need[1]}]'"
    return None


_clients: Dict[Tuple, object] = {}


def _client(uri: str, quick: bool = False):
    """Composer's ObjectStore for the bucket of `uri` (one per bucket, endpoint and credentials)."""
    from composer.utils.file_helpers import BACKEND_TO_OBJECT_STORE_FACTORY  # lazy: generate never loads Composer
    from composer.utils.object_store import S3ObjectStore  # lazy: (unless it reads from a store)
    problem = scheme_problem(uri)
    if problem:
        raise UserError(problem)
    scheme, bucket, _ = split(uri)
    # a client is bound to its endpoint and credentials
    key = (scheme, bucket, quick, os.environ.get("S3_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _clients:
        with _errors(uri, "connect"):
            _clients[key] = (S3ObjectStore(bucket, client_config=dict(QUICK) if quick else None)
                             if scheme == "s3" else BACKEND_TO_OBJECT_STORE_FACTORY[scheme](bucket, ""))
    return _clients[key]


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "AWS's default endpoint"


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Any failure of a store call as a StoreError naming the URI, the action and the likely fix."""
    try:
        yield
    except FileNotFoundError:
        raise StoreError(f"{uri}: not found ({action}); check the bucket and path, and that the credentials "
                         "may read it") from None
    except UserError:
        raise
    except Exception as e:  # botocore, google, oci and libcloud errors: no common base class
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
        name = type(e).__name__
        if code == "NoSuchBucket":
            why = "the bucket does not exist; create it or fix the bucket name"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or "Credential" in name:
            why = ("the credentials were refused; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                   "to ones that may use this bucket")
        elif "Endpoint" in name or "Connect" in name or "Timeout" in name:
            why = f"cannot reach the store at {_endpoint()}; check S3_ENDPOINT_URL and the network"
        else:
            why = f"{name}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        raise StoreError(f"{uri}: {action} failed: {why}") from None


def _key(uri: str) -> str:
    return split(uri)[2]


def exists(uri: str, quick: bool = False) -> bool:
    """Whether an object (not a prefix) exists at `uri`."""
    try:
        with _errors(uri, "look up"):
            _client(uri, quick).get_object_size(_key(uri))
        return True
    except StoreError as e:
        if ": not found" in str(e):
            return False
        raise


def names(uri: str, quick: bool = False) -> List[str]:
    """The objects under the prefix `uri`, as paths relative to it (sorted)."""
    prefix = _key(uri) + "/" if _key(uri) else ""
    with _errors(uri, "list"):
        keys = _client(uri, quick).list_objects(prefix)
    return sorted(k[len(prefix):] for k in keys if k.startswith(prefix) and len(k) > len(prefix))


def probe(uri: str, need: str = "folder") -> Optional[str]:
    """Reach `uri` with the quick client (seconds, not minutes): None when it is usable, else the problem
    in one line naming the URI. `need`: "object" (it must exist), "folder" (a prefix with objects or an
    object), "bucket" (the bucket must exist; the prefix may be empty: a place to write)."""
    problem = scheme_problem(uri)
    if problem:
        return problem
    try:
        if need != "bucket" and exists(uri, quick=True):
            return None
        if need == "object":
            return f"{uri}: not found; check the bucket and path"
        found = names(uri, quick=True)
        if need == "folder" and not found:
            return f"{uri}: nothing there; check the bucket and path"
    except StoreError as e:
        return str(e)
    return None


def download(uri: str, path: str) -> str:
    """Download one object to `path` (replaced atomically); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _errors(uri, "download"):
        _client(uri).download_object(_key(uri), path, overwrite=True)
    return path


def download_folder(uri: str, folder: str, only: Optional[Sequence[str]] = None) -> str:
    """Download the objects under the prefix `uri` (or the relative names `only`) into `folder`."""
    wanted = names(uri) if only is None else list(only)
    if not wanted:
        raise StoreError(f"{uri}: nothing there; check the bucket and path")
    for name in wanted:
        download(join(uri, name), os.path.join(folder, *name.split("/")))
    return folder


def upload(path: str, uri: str) -> None:
    with _errors(uri, "upload"):
        _client(uri).upload_object(_key(uri), path)


def write_text(uri: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        upload(f.name, uri)
    finally:
        os.remove(f.name)


def read_text(uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        with open(download(uri, os.path.join(tmp, "object")), encoding="utf-8") as f:
            return f.read()


def files_under(folder: str) -> List[str]:
    """Every file under `folder`, as sorted relative paths with `/`."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in files]
    return sorted(found)


def upload_folder(folder: str, uri: str, last: Sequence[str] = (), only: Optional[Sequence[str]] = None) -> None:
    """Upload the files of `folder` (or the relative names `only`) under the prefix `uri`; the names in
    `last` after all others, in that order: a reader that waits for them never sees half a folder."""
    todo = files_under(folder) if only is None else list(only)
    for name in [n for n in todo if n not in last] + [n for n in last if n in todo]:
        upload(os.path.join(folder, *name.split("/")), join(uri, name))


def delete(uri: str) -> None:
    """Delete one object (S3 API, GCS and OCI clients)."""
    store, key = _client(uri), _key(uri)
    with _errors(uri, "delete"):
        if split(uri)[0] == "s3":
            store.client.delete_object(Bucket=store.bucket, Key=key)
        elif split(uri)[0] == "gs":
            store.bucket.blob(key).delete()
        elif split(uri)[0] == "oci":
            store.client.delete_object(namespace_name=store.namespace, bucket_name=store.bucket, object_name=key)
        else:
            raise StoreError(f"{uri}: deleting objects is not supported on {split(uri)[0]}://; "
                             "set save_num_checkpoints_to_keep: -1 to keep every checkpoint")


def localize(uri: str, siblings: Sequence[str] = ()) -> str:
    """A local copy of `uri` (one object with the `uri + suffix` objects of `siblings` that exist, or
    every object under the prefix), downloaded into the cache as a whole: a partial download never
    replaces a complete one. Local paths are returned as given."""
    if not is_remote(uri):
        return uri
    target = local_mirror(uri, "downloads")
    partial = f"{target}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    if exists(uri):
        os.makedirs(partial)
        for suffix in ("", *siblings):
            if not suffix or exists(uri + suffix):
                download(uri + suffix, os.path.join(partial, os.path.basename(target) + suffix))
        for name in os.listdir(partial):
            _replace(os.path.join(partial, name), os.path.join(os.path.dirname(target), name))
        os.rmdir(partial)
        return target
    download_folder(uri, partial)
    _replace(partial, target)
    return target


def _replace(source: str, target: str) -> None:
    """Move `source` to `target`, replacing a file or folder there (the cache's, never a user's)."""
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.remove(target)
    os.replace(source, target)


# --- output prefixes: files.py's rule for output folders, for a prefix ---------------------------
# A command that writes under a prefix lists what it wrote in the object `<prefix>/.llmfoundry_lite.json`
# (files.MANIFEST, in files.py's format); a prefix holding objects it did not write is refused before any
# work unless the user passes --overwrite, which replaces the objects of the names it writes and keeps
# every other one. The command writes into a local staging folder and `publish_folder` uploads it.

def prefix_manifest(uri: str) -> Optional[dict]:
    """The manifest object of the prefix `uri` (see above), or None (none, or one no program of ours wrote)."""
    target = join(uri, MANIFEST)
    if not exists(target):
        return None
    try:
        data = json.loads(read_text(target))
    except ValueError:
        return None
    ok = isinstance(data, dict) and isinstance(data.get("writer"), str) and isinstance(data.get("files"), list)
    return data if ok and all(isinstance(n, str) and _inside(n) for n in data["files"]) else None


def write_prefix_manifest(uri: str, writer: str, names: Iterable[str]) -> None:
    write_text(join(uri, MANIFEST), json.dumps(
        {"writer": writer, "files": sorted(set(names)),
         "about": "written by llmfoundry-lite: the objects its re-runs may replace or remove"}, indent=1))


def claim_prefix(uri: str, writer: str, flag: str, overwrite: bool = False, writes: Iterable[str] = (),
                 overwrite_flag: str = "--overwrite",
                 overwrite_does: str = "it replaces the objects of the names it writes") -> Set[str]:
    """files.claim_folder's check for the prefix `uri` (nothing is written): allowed when it holds no
    objects, or its manifest is `writer`'s (then `writes` must be absent or listed), or with `overwrite`;
    else a UserError naming the prefix and `overwrite_flag`. Returns the objects `writer` wrote there."""
    manifest = prefix_manifest(uri)
    own = set(manifest["files"]) if manifest is not None and manifest["writer"] == writer else None
    present = [n for n in names(uri) if n != MANIFEST]
    foreign = present if own is None else [n for n in writes if n in present and n not in own]
    if foreign and not overwrite:
        raise _refusal(uri, flag, writer, foreign, manifest, overwrite_flag, overwrite_does)
    return own or set()


def publish_folder(folder: str, uri: str, writer: str, flag: str, overwrite: bool = False, last: Sequence[str] = (),
                   superseded: Optional[Callable[[str], bool]] = None, overwrite_flag: str = "--overwrite",
                   overwrite_does: str = "it replaces the objects of the names it writes") -> List[str]:
    """Upload the finished local `folder` under the prefix `uri` as files.staged_folder moves a staged
    folder into place: its files replace the objects of the same names, the objects `writer` wrote there
    before and did not write again are removed, as are those `superseded` says the new ones replace;
    replacing an object `writer` did not write needs `overwrite` (`claim_prefix`, which runs first).
    The order keeps the prefix usable or plainly unfinished: the manifest first lists what will be ours
    (a re-run after a kill recognises the objects), the old `last` objects are deleted (a reader waiting
    for them never sees old and new files mixed), every file is uploaded with `last` at the end, then the
    leftovers are deleted and the manifest lists the new files. Returns the names uploaded."""
    own = claim_prefix(uri, writer, flag, overwrite, (), overwrite_flag, overwrite_does)
    new = [n for n in files_under(folder) if n != MANIFEST and n.split("/")[0] != STAGING]
    present = set(names(uri)) - {MANIFEST}
    replaced = {n for n in present if n in new or (superseded is not None and superseded(n))}
    foreign = sorted(replaced - own)
    if foreign and not overwrite:
        raise _refusal(uri, flag, writer, foreign, prefix_manifest(uri), overwrite_flag, overwrite_does)
    write_prefix_manifest(uri, writer, own | set(new))
    for name in last:
        if name in present:
            delete(join(uri, name))
    upload_folder(folder, uri, last=last, only=new)
    for name in sorted(((own & present) | replaced) - set(new)):
        delete(join(uri, name))
    write_prefix_manifest(uri, writer, new)
    return new
