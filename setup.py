"""Build hook: generate the gRPC stubs from protos/ with grpcio-tools.

The stubs are never committed or hand-edited; every build (wheel or editable) regenerates them into the
`helip/` package next to this file, which is what both install modes import.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency, see pyproject [build-system]

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    for pkg in {ROOT / Path(p).parent for p in protos}:
        # Regular packages (not namespace ones) so that setuptools packs them into wheels.
        while pkg != ROOT:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent


# Every setuptools entry point (egg_info, build_py, editable_wheel) runs this file, and egg_info already needs
# the package directories to exist, so the stubs are generated before setup() rather than in a build command.
generate_stubs()
setup()
