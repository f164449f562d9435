"""Taking a concept out of the cumulative model again (``cns forget NAME``).

A concept's delta holds the *new values* of its rows and its token's embedding, and the model is
base + deltas applied in order. Removing the concept from the lineage therefore gives, with no
training and no model load:

- its rows back at the values they had before it (the pretrained values, or an earlier concept's
  where ``selection.exclude_owned`` was off and it retrained that concept's rows);
- its token gone from the tokenizer and the embedding table;
- every other concept's rows and token exactly as they were.

Later concepts that built on it: with exclusive ownership (the default) none of them trained its
rows, so nothing of it survives in them; their L_reg output term read its prompts, which only
made them avoid disturbing it. Where ``exclude_owned`` was off and a later concept retrained some
of its rows, those rows keep the later concept's values (they were trained from this concept's):
the removal records how many (``rows_kept_by_later_concepts``).

The removal is a new version (``lineage.removals``); the concept's files stay, so the versions
that hold it can still be rebuilt, and its dataset is not learned again when dropped again.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from cns.delta import load_masks
from cns.errors import CNSError
from cns.lineage import LINEAGE, Lineage, read_lineage, write_lineage


def forget(model_dir: str | Path, name: str) -> dict:
    """Write the version without concept ``name``; returns the removal record."""
    model_dir = Path(model_dir)
    lineage = read_lineage(model_dir)
    record = lineage.find(name) if lineage is not None else None
    if record is None:
        held = ", ".join(c.name for c in lineage.concepts) if lineage is not None else ""
        raise CNSError(model_dir / LINEAGE, f"holds no concept named '{name}'" + (f" (it holds {held})" if held else ""),
                       "concept_unknown")
    mine = load_masks(model_dir / record.mask)[0]["concept"]
    later = [c for c in lineage.concepts if c.version > record.version]
    kept = 0
    for other in later:
        theirs = load_masks(model_dir / other.mask)[0]["concept"]
        kept += sum(int((mine[n] & theirs[n]).sum()) for n in mine if n in theirs)
    removal = {"version": lineage.version + 1, "name": record.name, "token": record.token,
               "removed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "record": record.to_json(),
               "later_concepts": [c.name for c in later], "rows_kept_by_later_concepts": kept}
    write_lineage(model_dir, Lineage(base=lineage.base, concepts=[c for c in lineage.concepts if c.name != name],
                                     removals=[*lineage.removals, removal]))
    return removal
