"""The dashboard: server-rendered pages to browse, watch, change and compare runs.

    app.include_router(dashboard.router)   # what service.app.create_app does

``/`` lists the runs (search, filters, sort, pages, diverged runs marked), ``/ui/runs/{id}``
shows one run (live progress, tables, every plot with its options, downloads, rename, tag
and cancel), ``/ui/compare?runs=a,b`` several side by side, ``/ui/sweeps`` and
``/ui/sweeps/{id}`` the sweeps and their studies; ``/ui/login`` and ``/ui/logout`` when
``BNN_API_TOKEN`` is set. Templates (Jinja2), the stylesheet and the script ship in this
package; nothing is fetched from elsewhere. See :mod:`.pages`; pages are served again
from :mod:`.cache` until the catalog changes.
"""

from service.dashboard.pages import router

__all__ = ["router"]
