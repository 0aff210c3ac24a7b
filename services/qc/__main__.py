"""python -m services.qc [--port P]: run the quality-check service."""

from videomesh.launch import main

if __name__ == "__main__":
    main("qc")
