"""The Flower App Bundle (FAB) that `flwr run` builds from this repository: it carries the
app and its configs, not docs/ (run records, plots), and stays far below Flower's size cap,
which a FAB over it fails every run with."""

import io
import zipfile

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from fedmoe_app.config import APP_DIR


def test_the_app_bundle_holds_the_app_and_configs_but_no_docs_far_below_flowers_cap():
    fab = build_fab_from_disk(APP_DIR)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server_app.py", "client_app.py", "conf/base.yaml", "conf/devices.yaml", "strategies/__init__.py"} <= set(names)
    assert not [name for name in names if name.startswith("docs/")]
    assert len(fab) < FAB_MAX_SIZE / 4, f"the FAB is {len(fab):,} bytes; Flower refuses one over {FAB_MAX_SIZE:,}"
