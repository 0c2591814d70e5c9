"""Every SuperNode message is a fresh process: it must import only what that message needs.

Each check runs in a new interpreter and reads ``sys.modules`` afterwards, so it
fails the moment someone adds a top-level import of a heavy library on the way.
"""

from __future__ import annotations

import json
import subprocess
import sys

from client.data import demo
from tests.conftest import APP_DIR, TRAIN_MESSAGE

HEAVY = ("monai", "mlflow", "sklearn", "scipy", "matplotlib", "lifelines", "pydicom")


def _imported(code: str, watch=HEAVY) -> list[str]:
    """Run ``code`` in a fresh interpreter; the watched top-level packages it left in ``sys.modules``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(watch)!r})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=APP_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])




def test_an_oncology_train_or_evaluate_message_imports_neither_monai_mlflow_scipy_nor_sklearn(tmp_path):
    folder = tmp_path / "site"
    demo.write_site(folder, demo.REGIONS[3])
    for kind in ("train", "evaluate"):
        code = TRAIN_MESSAGE.format(folder=str(folder), endpoint="survival", features=len(demo.FEATURES), kind=kind)
        assert _imported(code) == [], kind


def test_importing_the_client_app_loads_no_data_or_analysis_library_nor_torch():
    assert _imported("import client.app", HEAVY + ("pandas", "torch")) == []


QUERY = """
import time
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from client.app import app

meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                created_at=time.time(), ttl=600.0, message_type="query")
context = Context(run_id=1, node_id=7, node_config={{"site-name": "Sjælland", "data-dir": {folder!r}}},
                  state=RecordDict(), run_config={{"task": "oncology", "endpoint": "survival", "seed": 42}})
reply = app(Message(content=RecordDict({{"config": ConfigRecord({{"request": "describe"}})}}), metadata=meta), context)
assert not reply.has_error(), reply.error
assert reply.content["metrics"]["num-train"] > 0
"""


def test_a_site_check_message_never_imports_torch(tmp_path):
    folder = tmp_path / "site"
    demo.write_site(folder, demo.REGIONS[3])
    assert _imported(QUERY.format(folder=str(folder)), HEAVY + ("torch",)) == []


def test_the_server_app_loads_no_report_or_radiology_library_for_training():
    # MLflow is the training run's tracker, so it may come; the validation report's libraries may not
    assert _imported("import server.app", ("monai", "matplotlib", "jinja2", "sklearn", "lifelines", "pydicom")) == []


def test_the_command_line_loads_neither_torch_flower_nor_mlflow_to_start():
    assert _imported("import server.cli", ("torch", "flwr", "mlflow", "monai", "pandas", "scipy", "pydicom")) == []


def test_the_app_folder_that_flower_walks_at_every_run_holds_no_environment():
    # `flwr run .` visits every file under the app folder before it filters (symlinked folders excepted): a
    # virtualenv inside it (50,000 files) cost 9 s per run. The Makefile keeps .venv a link to a folder elsewhere.
    from pathlib import Path

    from flwr.cli.utils import collect_files

    files = collect_files(Path(APP_DIR))
    assert len(files) < 5000, f"{len(files)} files under {APP_DIR}, e.g. {sorted(files)[-3:]}"
