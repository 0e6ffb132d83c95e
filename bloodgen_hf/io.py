"""Small file helpers shared by training, sampling and evaluation: atomic (and durable) writes, image grids."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; it replaces `target` only if the block succeeds.

    A crash or error leaves `target` as it was (absent or old) and removes the temporary. With
    `overwrite=False` the commit refuses (FileExistsError) a target that exists by then, so a
    command's output that another process wrote meanwhile is never replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not overwrite:
            _commit_new(tmp, target, is_dir)
        elif is_dir and target.exists():
            _replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def remove_temporaries(target: str | os.PathLike) -> list[Path]:
    """Clear what a process killed while writing `target` (kill -9, a power cut) left beside it; the paths removed.

    That is `atomic_path`'s temporaries `.<name>.<8 random characters>.tmp` (the pattern is exact, so
    those of `<name>.npz` are not those of `<name>`), and `.<name>.old`, a folder that `_replace_dir`
    moved aside where the OS has no atomic exchange: removed once `target` is in place, else moved back,
    since it is then the only copy. A live writer's temporaries look the same, so only the holder of
    `target`'s lock may call this (`guard.output_lock` does, on taking it).
    """
    target = Path(os.path.abspath(target))
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not old.is_symlink():
        if target.exists() or target.is_symlink():
            found.append(old)
        else:
            old.rename(target)
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(True)
    return found


def _commit_new(tmp: Path, target: Path, is_dir: bool) -> None:
    """Move `tmp` to `target` only if nothing is there (for files atomically: a hard link cannot replace)."""
    message = f"{target} appeared while this command was writing it; it is left as it is (--overwrite replaces it)"
    if target.exists() or target.is_symlink():
        raise FileExistsError(message)
    try:
        if is_dir:
            os.rename(tmp, target)  # fails on a non-empty folder that appeared since
        else:
            os.link(tmp, target)
            tmp.unlink()
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as err:
        raise FileExistsError(message) from err
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(message) from err
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap the new folder in with one atomic exchange where the OS offers it (Linux renameat2), so the
    target is never missing; else rename the old one aside first."""
    if _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the old folder
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_durably(path: str | os.PathLike, data: bytes | str) -> None:
    """Write and fsync a file, so a checkpoint that was renamed into place survives a power cut too."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or folder; a folder is first renamed aside, so a kill leaves no half of it in place."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{path.name}.deleted.tmp")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        shutil.rmtree(aside)
    elif path.exists() or path.is_symlink():
        path.unlink()


def reason(err: BaseException) -> str:
    """The short cause of a write failure ("No space left on device"), without errno decoration."""
    return getattr(err, "strerror", None) or str(err)


def save_image(image: np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [N,H,W,C] -> one uint8 [rows*H', nrow*W', C] picture, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so 28x28 grids are readable in a README."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def labelled_class_grid(images: np.ndarray, row_names: list[str], scale: int = 3, pad: int = 2) -> Image.Image:
    """uint8 [rows, cols, H, W, 3] -> a picture with one row per class, its name on the left."""
    from PIL import ImageDraw, ImageFont

    rows, cols = images.shape[:2]
    grid = upscale(make_grid(images.reshape(rows * cols, *images.shape[2:]), nrow=cols, pad=pad), scale)
    font = ImageFont.load_default()
    margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in row_names)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    cell = (images.shape[2] + pad) * scale
    for r, name in enumerate(row_names):
        draw.text((4, pad * scale + r * cell + cell // 2 - 6), name, fill="black", font=font)
    return canvas
