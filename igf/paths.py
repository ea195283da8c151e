"""Path safety: whether two paths name one file, whether a path lies inside a folder. Every refusal to overwrite
what a command reads (the driver's --output_dir, the filter's --output, Learner.save_pretrained) asks these."""
import os


def same_path(a, b):
    """Whether two paths name one file or folder (through symlinks, ``..`` and hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def within(path, folder):
    """Whether ``path`` is ``folder`` or lies anywhere under it (where a run reading the folder would find it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def touches(path, target):
    """Whether writing ``path`` would change ``target`` (a file or folder): it is ``target``, lies inside it, or is
    another name (a symlink, a hard link) of ``target`` or of a file under it."""
    if same_path(path, target) or (os.path.isdir(target) and within(path, target)):
        return True
    if not os.path.isfile(path) or not os.path.isdir(target):  # a new file is no other file's hard link
        return False
    return any(same_path(path, os.path.join(folder, name)) for folder, _, names in os.walk(target) for name in names)
