"""`snapshot(root)`: every entry under a folder, to assert that a command left the files around it unchanged."""
import hashlib
import os


def snapshot(root) -> dict:
    """relative path -> sha256 of a file's bytes (hidden files too), '<dir>' for a folder, '-> target' for a link."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                tree[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                tree[rel] = "<dir>"
            else:
                with open(path, "rb") as f:
                    tree[rel] = hashlib.sha256(f.read()).hexdigest()
    return tree
