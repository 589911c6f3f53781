"""The dashboard: server-rendered pages to browse, watch and compare runs.

    app.include_router(dashboard.router)   # what service.app.create_app does

``/`` lists the runs (search, filters, sort, pages), ``/ui/runs/{id}`` shows one run and
``/ui/compare?runs=a,b`` several side by side. Templates (Jinja2), the stylesheet and the
script ship in this package; nothing is fetched from elsewhere. See :mod:`.pages`.
"""

from service.dashboard.pages import router

__all__ = ["router"]
