"""Shared helpers for the checkpoint-format tests."""

TOL = dict(atol=1e-5, rtol=1e-5)


def truncate(path, frac=0.5):
    """Cut a file to ``frac`` of its length, as an interrupted download or copy would."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * frac)])


#: Calls recorded by :class:`Evil` payloads: stays empty unless a loader ran code from a file.
SIDE_EFFECTS = []


def _side_effect(*args):
    SIDE_EFFECTS.append(args)
    return args


class Evil:
    """A pickle payload that calls a function when unpickled with ``weights_only=False``."""

    def __reduce__(self):
        return (_side_effect, ("ran code from the checkpoint",))
