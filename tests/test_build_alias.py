"""``ohq_tvm.build``, the old name of :mod:`ohq_tvm.codegen`, still imports: the same objects, with a
DeprecationWarning naming the new module that Python's default filters show; the new names never warn.

Each check runs in a fresh interpreter: the warning is raised once, when the alias is first imported, and
the suite has imported the package long before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Every submodule the package had as ohq_tvm.build (from git history; later ones get no old name).
OLD_SUBMODULES = [
    "conv_schedule",
    "elf",
    "fidelity",
    "module",
    "schedules",
    "toolchain",
    "tune",
    "tune_builder",
    "tuned_build",
    "tuning_database",
    "verify",
]

FIRST_OLD_IMPORT = "import ohq_tvm.build.verify  # under the default filters: what a user's script sees"
PROBE = textwrap.dedent("""
    import importlib, json, sys, warnings

    with warnings.catch_warnings(record=True) as new_warnings:
        warnings.simplefilter("always")
        import ohq_tvm.codegen
        for name in json.loads(sys.argv[1]):
            importlib.import_module(f"ohq_tvm.codegen.{name}")
        from ohq_tvm.codegen import find_toolchain, tune_module

    import ohq_tvm.build.verify  # under the default filters: what a user's script sees
    from ohq_tvm.build import find_toolchain as old_find_toolchain, tune_module as old_tune_module
    from ohq_tvm.build.module import build_executable as old_build_executable
    from ohq_tvm import build as old

    codegen = ohq_tvm.codegen
    print(json.dumps({
        "new_warnings": [str(w.message) for w in new_warnings if "ohq_tvm" in str(w.message)],
        "submodules_same": {
            name: sys.modules[f"ohq_tvm.build.{name}"] is getattr(codegen, name) is getattr(old, name)
            for name in json.loads(sys.argv[1])
        },
        "names_same": {name: getattr(old, name) is getattr(codegen, name) for name in codegen.__all__},
        "all_same": old.__all__ == codegen.__all__,
        "imported_same": [
            ohq_tvm.build.verify is codegen.verify,
            old_find_toolchain is find_toolchain,
            old_tune_module is tune_module,
            old_build_executable is codegen.module.build_executable,
        ],
    }))
""")


def test_old_names_warn_once_and_give_the_new_objects(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(OLD_SUBMODULES)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["new_warnings"] == []
    assert found["submodules_same"] == dict.fromkeys(OLD_SUBMODULES, True)
    assert found["names_same"] and all(found["names_same"].values())
    assert {"find_toolchain", "tune_module", "build_executable"} <= set(found["names_same"])
    assert found["all_same"] is True
    assert found["imported_same"] == [True, True, True, True]
    # Shown under the default filters, once, attributed to the line that first imports the old name.
    line = 1 + PROBE.splitlines().index(FIRST_OLD_IMPORT)
    deprecations = [text for text in proc.stderr.splitlines() if "DeprecationWarning" in text]
    assert len(deprecations) == 1, proc.stderr[-2000:]
    assert deprecations[0].startswith(f"<string>:{line}: DeprecationWarning: ohq_tvm.build is deprecated")
    assert "ohq_tvm.codegen" in deprecations[0]
