"""Mix chips of a second dataset (e.g. the synthetic default) into a real split's training side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cloudseg.data.validate import ValidatedSplit


def merge_splits(base: ValidatedSplit, extra: ValidatedSplit, n_extra: int | None = None, prefix: str = "mix_",
                 seed: int = 0) -> tuple[ValidatedSplit, list[str]]:
    """One split holding ``base`` and (a seeded sample of) ``extra``.

    Extra chips get ids and locations prefixed with ``prefix``, so they never collide with the base's and never
    share a location with it. Arrays are shared, not copied.

    Args:
        base: A split (its chips keep their ids); loaded or read from disk on demand, as is ``extra``.
        extra: Another loaded, labeled split.
        n_extra: How many extra chips to take (seeded random sample); None = all.
        prefix: Prefix of the extra chips' ids and locations.
        seed: Seed of the sample.

    Returns:
        The merged split and the (prefixed) ids of the extra chips in it.

    Raises:
        ValueError: ``extra`` has no labels, or ``n_extra`` exceeds its size.
    """
    if not extra.has_labels:
        raise ValueError(f"merge_splits: {extra.root} ({extra.split}) has no labels to train on")
    if tuple(extra.bands) != tuple(base.bands):
        raise ValueError(f"merge_splits: {extra.root} ({extra.split}) was read with bands {','.join(extra.bands)} "
                         f"but {base.root} with {','.join(base.bands)}: both need the same bands")
    ids = list(extra.ids)
    if n_extra is not None:
        if not 0 <= n_extra <= len(ids):
            raise ValueError(f"n_extra={n_extra} but {extra.root} has {len(ids)} chips")
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=n_extra, replace=False).tolist())
    new_ids = [prefix + c for c in ids]
    meta = extra.metadata.loc[ids].copy()
    meta.index = pd.Index(new_ids, name=base.metadata.index.name)
    meta["location"] = prefix + meta["location"].astype(str)
    merged = ValidatedSplit(
        root=base.root, split=base.split, metadata=pd.concat([base.metadata, meta]), ids=list(base.ids) + new_ids,
        has_labels=base.has_labels,
        images={**base.images, **{n: extra.images[c] for n, c in zip(new_ids, ids) if c in extra.images}},
        masks={**base.masks, **{n: extra.masks[c] for n, c in zip(new_ids, ids) if c in extra.masks}},
        mixed_ids=list(base.mixed_ids) + new_ids,
        origin={**base.origin, **{n: extra.origin.get(c, (extra.root, extra.split, c)) for n, c in zip(new_ids, ids)}},
        bands=tuple(base.bands),
    )
    return merged, new_ids
