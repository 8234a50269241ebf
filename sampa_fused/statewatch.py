"""`opt.state` that notices edits. torch's optimizers read `opt.state` at
every step, so `opt.state[p]["momentum_buffer"] = t`, `del opt.state[p]` or
`opt.state.clear()` act at the next step. Here the state lives in flat
buffers and `opt.state` holds views of them; these dict types raise a flag
on any edit, and the step (which then compares `opt.state` with the flat
buffers) costs nothing while nobody edits.
"""
from __future__ import annotations

from collections import defaultdict


class Watch:
    """The flag: set by any edit of `opt.state` or of one of its entries."""

    def __init__(self) -> None:
        self.dirty = False


_UNWATCHED = Watch()      # entries made by code that copies dict types (e.g. Lightning)


def _noting(cls, names):
    for name in names:
        plain = getattr(cls.__mro__[1], name)

        def method(self, *args, _plain=plain, **kwargs):
            self._watch.dirty = True
            return _plain(self, *args, **kwargs)
        method.__name__ = name
        setattr(cls, name, method)
    return cls


_MUTATORS = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "update", "setdefault", "__ior__")


class WatchedEntry(dict):
    """opt.state[p]: a dict whose edits set the watch's flag."""
    _watch = _UNWATCHED


_noting(WatchedEntry, _MUTATORS)


class EntryFactory:
    """The default factory of opt.state (a class, so the dict still pickles)."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    def __call__(self) -> WatchedEntry:
        entry = WatchedEntry()
        entry._watch = self.watch
        return entry


class WatchedState(defaultdict):
    """opt.state: torch's defaultdict(dict), whose edits set the watch's flag."""
    _watch = _UNWATCHED


_noting(WatchedState, _MUTATORS)


def watched(state, watch: Watch) -> WatchedState:
    """`state` as a WatchedState with WatchedEntry values (the same tensors);
    `state` itself if it already is one of this watch's."""
    if not (type(state) is WatchedState and state._watch is watch):
        new = WatchedState(EntryFactory(watch))
        new._watch = watch
        dict.update(new, state)
        state = new
    for p, entry in state.items():
        if not (type(entry) is WatchedEntry and entry._watch is watch):
            new_entry = WatchedEntry(entry)
            new_entry._watch = watch
            dict.__setitem__(state, p, new_entry)
    return state
