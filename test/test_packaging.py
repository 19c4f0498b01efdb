"""The package as ROS users get it: colcon build and install tree, launch files, package.xml, style, Python 3.10."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rosutil import next_domain_id  # this run's own domain ids: another graph on the machine never answers

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dinomix_ros"
# import name -> rosdep key that provides it (standard library and our own package need none)
ROSDEP_KEYS = {
    "torch": "python3-torch", "numpy": "python3-numpy", "cv2": "python3-opencv", "PIL": "python3-pil",
    "faiss": "python3-faiss", "rosbags": "python3-rosbags-pip", "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib", "yaml": "python3-yaml", "rclpy": "rclpy", "sensor_msgs": "sensor_msgs",
    "geometry_msgs": "geometry_msgs", "std_msgs": "std_msgs", "std_srvs": "std_srvs", "nav_msgs": "nav_msgs",
    "visualization_msgs": "visualization_msgs", "diagnostic_msgs": "diagnostic_msgs",
    "lifecycle_msgs": "lifecycle_msgs", "builtin_interfaces": "builtin_interfaces", "rcl_interfaces": "rcl_interfaces",
    "rosgraph_msgs": "rosgraph_msgs",
    "launch": "launch", "launch_ros": "launch_ros", "ament_index_python": "ament_index_python",
    "tf2_ros": "tf2_ros",  # camera extrinsics from TF; imported guarded (not on PyPI: not in the test venvs)
}
# no rosdep key: imported lazily, the error names the `pip install` (package.xml says so in a comment); gtsam only
# by the pose-graph evaluation (a test requirement), pymilvus (and grpc) only when a fleet is set
OPTIONAL_IMPORTS = {"safetensors", "onnx", "onnxruntime", "gtsam", "pymilvus", "grpc"}


def _imports(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _exec_depends() -> set[str]:
    root = ET.parse(REPO / "package.xml").getroot()
    return {e.text for e in root.iter() if e.tag in ("exec_depend", "depend")}


def test_package_xml_declares_what_the_code_imports() -> None:
    sources = list(PACKAGE.rglob("*.py")) + list((REPO / "launch").glob("*.py"))
    third_party = _imports(sources) - set(sys.stdlib_module_names) - {"dinomix_ros"} - OPTIONAL_IMPORTS
    unknown = sorted(third_party - set(ROSDEP_KEYS))
    assert not unknown, f"imports without a known rosdep key: {unknown} (add them to package.xml and this table)"
    missing = sorted({ROSDEP_KEYS[m] for m in third_party} - _exec_depends())
    assert not missing, f"package.xml lacks exec_depend on {missing}"
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "dinomix_ros"
    assert root.find("export/build_type").text == "ament_python"


def test_core_modules_never_import_rclpy() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if "ros" not in p.relative_to(PACKAGE).parts]
    ros_modules = {m for m in ROSDEP_KEYS if m.endswith("_msgs") or m in ("rclpy", "rcl_interfaces", "launch")}
    offenders = {p.name: _imports([p]) & ros_modules for p in core if _imports([p]) & ros_modules}
    assert not offenders, f"ROS imports in the ROS-free core: {offenders}"


def test_sources_parse_as_python_3_10() -> None:
    """Robots run Humble on Python 3.10: no 3.11+ syntax anywhere (APIs are kept to 3.10 by review)."""
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "launch").glob("*.py"), REPO / "setup.py"]:
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))


def test_flake8_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "flake8", "dinomix_ros", "test", "bench", "launch", "setup.py"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory) -> Path:
    """`colcon build` of a copy of the package in a fresh workspace."""
    colcon = Path(sys.executable).with_name("colcon")
    if not colcon.exists():
        pytest.fail(f"colcon is not installed next to {sys.executable}: run `make setup`")
    ws = tmp_path_factory.mktemp("ws")
    src = ws / "src" / "dinomix_ros"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "install", "log", "runs",
                                                             "__pycache__", ".pytest_cache", "data"))
    env = dict(os.environ, PATH=f"{colcon.parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([str(colcon), "build", "--base-paths", "src"], cwd=ws, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ws / "install" / "dinomix_ros"


def test_colcon_installs_executables_launch_and_config(colcon_install: Path) -> None:
    share = colcon_install / "share" / "dinomix_ros"
    lib = colcon_install / "lib" / "dinomix_ros"
    for name in ("localize_node", "bag_replay", "dinomix", "dinomix_demo", "transport_env"):
        assert (lib / name).is_file() and os.access(lib / name, os.X_OK), f"{name} not installed in {lib}"
    for rel in ("package.xml", "launch/localize.launch.py", "launch/build_map.launch.py", "config/localize.yaml",
                "config/fastdds_large_images.xml", "config/dinomix.rviz", "maps/README.md"):
        assert (share / rel).is_file(), f"{rel} not installed in {share}"
    assert (colcon_install / "share" / "ament_index" / "resource_index" / "packages" / "dinomix_ros").is_file()


def test_dinomix_is_on_path_after_sourcing_the_workspace(colcon_install: Path) -> None:
    """README and the node's own errors say `dinomix map build`: it must be on PATH after colcon + setup.bash."""
    setup = colcon_install.parent / "setup.bash"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLCON", "AMENT"))}
    result = subprocess.run(["bash", "-c", f"set +u; source {setup}; command -v dinomix; dinomix map --help"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == str(colcon_install / "bin" / "dinomix")
    assert "build" in result.stdout and "topics" in result.stdout


def test_launch_files_reference_installed_executables_and_files(colcon_install: Path) -> None:
    share = colcon_install / "share" / "dinomix_ros"
    lib = colcon_install / "lib" / "dinomix_ros"
    for launch in (share / "launch").glob("*.launch.py"):
        text = launch.read_text()
        for executable in re.findall(r'executable="([^"]+)"', text):
            assert (lib / executable).is_file(), f"{launch.name} runs {executable}, which is not installed"
        for folder, name in re.findall(r'FindPackageShare\("dinomix_ros"\), "(\w+)", "([^"]+)"', text):
            assert (share / folder / name).is_file(), f"{launch.name} refers to {folder}/{name}, not installed"
        for sibling in re.findall(r'"(\w+\.launch\.py)"', text):
            assert (share / "launch" / sibling).is_file(), f"{launch.name} loads {sibling}, not installed"
        tree = ast.parse(text)
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "generate_launch_description" in functions, launch.name
    localize = (share / "launch" / "localize.launch.py").read_text()
    for arg in ("params_file", "namespace", "map_path", "checkpoint", "device", "use_sim_time", "camera_topics",
                "create_if_missing", "large_image_profile", "pose_topic", "pose_type", "pose_max_gap_s"):
        assert f'"{arg}"' in localize, f"launch argument {arg} missing"


def test_installed_node_runs_from_the_install_tree(colcon_install: Path, tmp_path: Path) -> None:
    """The console script colcon installed starts the node with the installed package (not the source tree)."""
    site = next(colcon_install.glob("lib/python3*/site-packages"))
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(next_domain_id()),
               ROS_LOG_DIR=str(tmp_path), PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    script = colcon_install / "lib" / "dinomix_ros" / "localize_node"
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), "--ros-args", "-p", "model.checkpoint:=/missing.ckpt"],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "configuration failed" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=30)
    text = log.read_text()
    assert "configuration failed: weights file /missing.ckpt does not exist" in text, text
    assert code == 0, text
    assert str(site) in subprocess.run([sys.executable, "-c", "import dinomix_ros; print(dinomix_ros.__file__)"],
                                       env=env, cwd=tmp_path, capture_output=True, text=True).stdout


def test_readme_architecture_map_matches_the_package() -> None:
    """Every sub-package and module of dinomix_ros is in the README's architecture map, and nothing else is."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Development"):readme.index("## Licences and data")]
    tree = section[section.index("```"):section.index("```", section.index("```") + 3)]
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py")} - {"dinomix_ros"}
    named = set(re.findall(r"\b([a-z_0-9]+\.py)\b", tree))
    assert modules - named == set(), f"modules missing from the README map: {sorted(modules - named)}"
    assert named - modules == set(), f"the README map names modules that do not exist: {sorted(named - modules)}"
    for package in packages:
        assert f"{package}/" in tree, f"sub-package {package}/ missing from the README map"
