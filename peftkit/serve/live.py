"""Adapters added to and removed from a running :class:`~peftkit.serve.serving.Server`.

Adding one does not rebuild the model: peft's ``add_adapter`` wraps the base's layers once more (or adds one more
entry to the LoRA layers already there) and the adapter's weights are loaded into it, exactly as ``load_server``
puts in each of its adapters. Neither change is safe while a forward pass runs on the model, so the HTTP server
calls these from its one model thread, between batches. ``server.adapters`` and ``server.peft_names`` are
replaced by new dicts rather than changed in place, so another thread reading them sees the old or the new set,
never one half-changed.
"""

from __future__ import annotations

from itertools import count

from ..core.models import user_trust
from ..errors import PeftkitError
from ..naming import BASE
from ..store.snapshot import read_snapshot
from .served_adapter import prepare
from .serving import Server, peft_name
from .sharing import check_together, describe_adapter, inject, shared_class


def add_adapter(server: Server, name: str) -> None:
    """Load registered adapter ``name`` from the server's registry onto its base."""
    setup = server.setup
    if setup is None:
        raise PeftkitError("this server was not built by load_server; it cannot load adapters while it runs")
    if name == BASE or ":" in name:
        raise PeftkitError(f"{name!r} is not an adapter's name in the registry; name the adapter itself")
    if name in server.adapters:
        raise PeftkitError(f"adapter {name!r} is already loaded")
    snapshot = read_snapshot(setup.registry, name)
    check_together([*server.adapters.values(), snapshot], setup.quantized)
    user_trust(snapshot.metadata.recipe.base, name, **setup.trust)  # refuses a base that needs code not allowed
    head = snapshot.metadata.task.head()
    if not server.encoder_decoder:
        loaded = list(server.adapters.values())
        auto = shared_class([*loaded, snapshot], [a.task for a in loaded] + [head], server.decoder)
        if auto != setup.auto_class:  # every loaded adapter agrees with the base's class, so the newcomer differs
            raise PeftkitError(f"{name} needs the base loaded as {auto}; this server's base is {setup.auto_class}")
    served = prepare(snapshot, server.model, setup.strip_prefix)
    used = set(server.peft_names.values())
    internal = next(peft_name(i) for i in count() if peft_name(i) not in used)
    try:
        inject(server.peft_model, internal, served)
    except BaseException:
        if internal in server.peft_model.peft_config:  # leave the model as it was
            server.peft_model.delete_adapter(internal)
        raise
    server.peft_names = {**server.peft_names, name: internal}
    server.adapters = {**server.adapters, name: served}
    server.description["adapters"] = {**server.description["adapters"], name: describe_adapter(snapshot)}


def remove_adapter(server: Server, name: str) -> None:
    """Take adapter ``name`` (its LoRA weights and head) off the server's base."""
    if name not in server.adapters:
        raise PeftkitError(f"adapter {name!r} is not loaded in this server (loaded: {', '.join(server.adapters)})")
    if len(server.adapters) == 1:
        # peft keeps at least one adapter in a model; a server with none would serve only the base
        raise PeftkitError(f"{name} is the only adapter loaded; load another before unloading it")
    internal = server.peft_names[name]
    server.adapters = {k: v for k, v in server.adapters.items() if k != name}
    server.peft_names = {k: v for k, v in server.peft_names.items() if k != name}
    server.description["adapters"] = {k: v for k, v in server.description["adapters"].items() if k != name}
    server.peft_model.delete_adapter(internal)
