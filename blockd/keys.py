"""A node's CurveZMQ identity: its key pair, in a key directory apart from volume data.

    <key dir>/node.public   the Z85 public key (give it to peers: `blockd peer add ... --public-key`)
    <key dir>/node.secret   the Z85 secret key, mode 0600

A wiped data dir must not change who the node is, so the default key dir is
not inside it: $BLOCKD_KEY_DIR, else /etc/blockd/keys as root, else
~/.config/blockd/keys.  zmq is imported only when a key pair is generated.
"""

import os
import re

from .errors import BadInput, BlockdError, NotFound, Refused

ENV_KEY_DIR = "BLOCKD_KEY_DIR"
PUBLIC = "node.public"
SECRET = "node.secret"
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def default_key_dir():
    env = os.environ.get(ENV_KEY_DIR)
    if env:
        return env
    if os.geteuid() == 0:
        return "/etc/blockd/keys"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "blockd", "keys")


def check_public_key(text):
    if not isinstance(text, str) or not _Z85.match(text):
        raise BadInput(f"invalid public key {text!r}: expected 40 Z85 characters (see `blockd keys show`)")
    return text


def generate(key_dir, force=False):
    """Write a new key pair; refuse to replace one unless ``force``.  Returns the public key."""
    import zmq

    public_path = os.path.join(key_dir, PUBLIC)
    secret_path = os.path.join(key_dir, SECRET)
    if os.path.exists(secret_path) and not force:
        raise Refused(
            f"key dir {key_dir} already has a key pair (public {load_public(key_dir)}); "
            "--force replaces it, and every peer must then be given the new public key"
        )
    try:
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        public, secret = zmq.curve_keypair()
        tmp = secret_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secret + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, secret_path)
        tmp = public_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(public + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, public_path)
        dfd = os.open(key_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise BlockdError(f"key dir {key_dir}: {exc.strerror}") from None
    return public.decode()


def _read(path, what, key_dir):
    try:
        with open(path, "rb") as f:
            text = f.read().strip().decode()
    except FileNotFoundError:
        raise NotFound(f"no node key pair in {key_dir}: run `blockd keys generate --key-dir {key_dir}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BlockdError(f"cannot read the {what} key in {key_dir}: {exc}") from None
    if not _Z85.match(text):
        raise BlockdError(f"{path}: not a Z85 {what} key")
    return text


def load_public(key_dir):
    return _read(os.path.join(key_dir, PUBLIC), "public", key_dir)


def load(key_dir):
    """(public, secret) as bytes, for zmq socket options."""
    return load_public(key_dir).encode(), _read(os.path.join(key_dir, SECRET), "secret", key_dir).encode()
