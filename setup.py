from glob import glob

from setuptools import find_packages, setup

package_name = "dinomix_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        ("share/" + package_name + "/maps", ["maps/README.md"]),
        ("bin", ["scripts/dinomix"]),  # `dinomix` on PATH after sourcing the workspace (see the script)
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="dinomix_ros maintainers",
    maintainer_email="dinomix-ros@example.com",
    description="DINO-Mix visual place recognition for ROS 2: place matches, pose priors and loop closures.",
    license="MIT",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "dinomix = dinomix_ros.cli.main:main",
            "localize_node = dinomix_ros.ros.localizer_node:main",
            "bag_replay = dinomix_ros.ros.replay:main",
            "dinomix_demo = dinomix_ros.ros.demo:main",
            "transport_env = dinomix_ros.ros.transport:main",
        ],
    },
)
