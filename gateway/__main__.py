"""python -m gateway [--port P]: run the public gateway."""

from videomesh.launch import main

if __name__ == "__main__":
    main("gateway")
