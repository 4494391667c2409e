import subprocess
import sys


def test_boxloss_imports_with_torch_only():
    """boxloss must import without torchvision, mmengine or matplotlib (SPEC §2)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torchvision', 'mmengine', 'matplotlib', 'pycocotools'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import boxloss, boxloss.recog\n"
        "print(len(boxloss.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 20
