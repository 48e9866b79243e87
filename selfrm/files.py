"""Files that a crash or kill never leaves half-written, and the run folder's lock.

Every output is written under a temporary name beside its target (`.NAME.XXXX.tmp`), then
renamed into place (atomic on POSIX file systems). A kill leaves at most such temporaries,
which `remove_leftovers` deletes at the next start. Created files and folders get the modes
the umask gives (tempfile would make them 0600/0700, safetensors 0600).
"""
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager

TMP_SUFFIX = ".tmp"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give `path` (and, for a folder, everything in it) the modes a plain open/mkdir would."""
    mask = _umask()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path):
    """Yield a temporary file path; on success it replaces `path`, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder; on success it replaces the folder `path` whole. (A folder
    cannot be replaced in one step: the old one is renamed aside first. Outputs that are
    replaced while a run goes on, like the checkpoint, are single files instead.)"""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=parent)
    try:
        yield tmp
        follow_umask(tmp)
        if os.path.exists(path):
            old = tmp + ".old" + TMP_SUFFIX
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def publish_together(writes):
    """Write several files so that they appear together: every one is written whole under a
    temporary name first, then all are renamed in one go. An error at any point leaves none
    of them (renamed ones are taken back); only a kill in the microseconds between two
    renames can leave a part, which is why readers of a set check for all of it.
    writes: [(path, function(tmp_path) that writes it)]."""
    done, published = [], []
    try:
        for path, write in writes:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            follow_umask(tmp)
        try:
            for tmp, path in done:
                os.replace(tmp, path)
                published.append(path)
        except BaseException:
            for path in published:
                os.remove(path)
            raise
    finally:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_leftovers(folder):
    """Delete the temporaries that killed writes left in `folder` (recursively). Returns how
    many went."""
    removed = 0
    if not os.path.isdir(folder):
        return 0
    for root, dirs, files in os.walk(folder, topdown=True):
        for name in list(dirs) + files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                target = os.path.join(root, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
                removed += 1
                if name in dirs:
                    dirs.remove(name)
    return removed


def dump_json(path, obj):
    """Write `obj` as indented JSON (plain: atomic callers write to a temporary path)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def dump_jsonl(path, rows):
    """Write one JSON object a line (plain: atomic callers write to a temporary path)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        dump_json(tmp, obj)


def write_jsonl(path, rows):
    with atomic_path(path) as tmp:
        dump_jsonl(tmp, rows)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(path):
    """{"size", "sha256"} of a file: a rerun compares it to tell changed input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- the run's lock

class Locked(RuntimeError):
    pass


def lock(folder):
    """Hold an exclusive lock on folder/.lock for the life of this process (fcntl record lock:
    released by the kernel when the process ends, however it ends). The file stays empty; a
    second process learns the holder's pid from F_GETLK. Returns the open descriptor."""
    path = os.path.join(folder, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = holder(fd)
        os.close(fd)
        raise Locked(f"{folder} is in use by another selfrm process (pid {pid}): wait for it to finish, "
                     f"or choose another --out_dir") from None
    return fd


FLOCK = "hhqqi"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


def holder(fd):
    """The pid holding a write lock on the open file `fd` (None when none does)."""
    query = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return pid if l_type != fcntl.F_UNLCK else None
