"""The open-file limit, raised at start-up and kept above the connection limit.

Every WebSocket and event stream holds a socket: a file descriptor. If the
descriptors run out before ``TRIOWS_MAX_CONNECTIONS`` is reached, ``accept``
fails (EMFILE) and new connections wait in the kernel's backlog: a handshake
hangs instead of getting its 503, and ``/healthz`` goes unanswered. So the
soft limit is raised to the hard one, and if the connection limit plus
``TRIOWS_OPEN_FILES_RESERVE`` still does not fit under it, the connection
limit is lowered to fit, with one warning line naming both numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import resource

from triows.logs import configure_logging, log_event
from triows.settings import Settings, SettingsError


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in force.

    A hard limit of "unlimited" cannot be the soft one (Linux caps it at
    ``fs.nr_open``, macOS at ``OPEN_MAX``): then the soft limit stays.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            log_event("open_file_limit_kept", level=logging.WARNING, soft=soft, error=str(error))
        else:
            soft = hard
    return soft


def fit_connections_to_open_files(settings: Settings) -> Settings:
    """``settings`` with ``max_connections`` lowered to fit the open-file limit, if needed.

    Raises :class:`SettingsError` when the limit does not even hold the
    reserve and one connection.
    """
    # These are start-up lines, logged before the app (which configures logging) exists.
    configure_logging(settings.instance_id, settings.log_level)
    limit = raise_open_file_limit()
    reserve = settings.open_files_reserve
    if limit == resource.RLIM_INFINITY or settings.max_connections + reserve <= limit:
        return settings
    fits = limit - reserve
    if fits < 1:
        raise SettingsError(
            f"the open-file limit ({limit}) leaves no descriptor for connections after "
            f"TRIOWS_OPEN_FILES_RESERVE={reserve}: raise it (ulimit -n, LimitNOFILE=, "
            "the container's nofile) or lower the reserve"
        )
    log_event(
        "max_connections_lowered",
        level=logging.WARNING,
        max_connections=settings.max_connections,
        open_file_limit=limit,
        reserve=reserve,
        lowered_to=fits,
    )
    return dataclasses.replace(settings, max_connections=fits)
