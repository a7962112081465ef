"""Commands guard the user's data: an output never is, contains, or lies inside one of its inputs."""

from __future__ import annotations

from pathlib import Path


def is_local(url: str) -> bool:
    """A plain file path (not ``http://...``, ``pipe:...``, ``s3://...``), so it can be checked before reading."""
    return "://" not in url and not url.startswith("pipe:")


def refuse_overlap(output: str | Path, inputs: list[str | Path], flag: str = "--out") -> None:
    """Raise ValueError when ``output`` is, contains, or lies inside an input (symlinks resolved).

    Writing there could replace or empty an input before it is read, or mix outputs into the inputs.
    """
    out = Path(output).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if out == path or path in out.parents or out in path.parents:
            relation = "is" if out == path else ("lies inside" if path in out.parents else "contains")
            raise ValueError(f"{flag} {output} {relation} the input {given}: write to a separate folder "
                             "(an output never overlaps its inputs, so no input is replaced or emptied)")
