"""``import fusedls`` needs no transformers; ``import fusedls.transformers`` says how to get it."""

import subprocess
import sys
import textwrap


def test_import_without_transformers():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # as if transformers were not installed
        import fusedls
        assert "fusedls.transformers" not in sys.modules
        try:
            import fusedls.transformers
        except ImportError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fusedls.transformers needs the transformers package: pip install 'fusedls[transformers]'"
