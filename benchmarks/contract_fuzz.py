"""``make fuzz``: Schemathesis against the real server, many cases, SQLite and PostgreSQL.

    python benchmarks/contract_fuzz.py [--examples 60] [--seed N] [--pg URL] [--out DIR]

Trains three tiny runs, starts ``tests/service/live_server.py`` (uvicorn, authentication
on, jobs recorded instead of trained) once per catalog, pushes the runs to it and runs
``st run --checks all`` over the examples, coverage, fuzzing and stateful phases. Prints,
per catalog, the test cases generated, 5xx answers, schema violations (known ones, from
tests/service/test_contract.py, apart) and the server's tracebacks; exits 1 when a 5xx
or an unknown violation was found, or fewer than ``--min-cases`` cases ran in total.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service.live_server import run_schemathesis, seeded_server, train_seed_runs
from tests.service.test_contract import KNOWN, TOKEN, triage

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_schema_url(admin: str) -> tuple[str, object]:
    """A URL whose connections use a fresh schema (and the engine to drop it)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    schema = f"fuzz_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(admin).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), (engine, schema)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=120, help="max examples per operation")
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL admin URL ('' to skip)")
    parser.add_argument("--min-cases", type=int, default=10_000, help="total, both catalogs")
    parser.add_argument("--out", type=Path, default=None, help="keep reports here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bnn-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    local = train_seed_runs(root / "seed_runs")
    catalogs = ["sqlite", *(["postgresql"] if args.pg else [])]
    total, bad = 0, False
    for catalog in catalogs:
        url, cleanup = (None, None) if catalog == "sqlite" else pg_schema_url(args.pg)
        server = seeded_server(root / catalog, local, url, TOKEN)
        try:
            run = run_schemathesis(
                server, root / catalog / "report", max_examples=args.examples, seed=args.seed
            )
            tracebacks = server.output().count("Traceback")
        finally:
            server.stop()
            if cleanup is not None:
                engine, schema = cleanup
                with engine.connect() as conn:  # type: ignore[attr-defined]
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                engine.dispose()  # type: ignore[attr-defined]
        unknown, known, errors = triage(run)
        total += run.cases
        print(f"== {catalog}: {run.cases} cases over {run.operations} operations")
        print(f"   5xx answers: {len(run.server_errors)}")
        print(f"   schema violations: {len(run.schema_violations)} found, {len(unknown)} unknown")
        tool = {k.name for k in KNOWN if k.tool}
        for name, found in sorted(known.items()):
            kind = "tool limitation (the server is right)" if name in tool else "known API finding"
            print(f"     {kind} {name}: {len(found)}")
        for finding in unknown:
            print(f"     UNKNOWN {finding.headline()}")
        print(f"   schemathesis errors: {len(run.errors)} ({len(errors)} not known tool errors)")
        print(f"   server tracebacks: {tracebacks}")
        print(f"   report: {root / catalog / 'report'}")
        bad |= bool(run.server_errors or unknown or errors or tracebacks)
    print(f"== total: {total} cases on {', '.join(catalogs)}")
    if total < args.min_cases:
        print(f"fewer than {args.min_cases} cases: raise --examples")
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
