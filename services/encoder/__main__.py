"""python -m services.encoder [--port P]: run the text encoder service."""

from videomesh.launch import main

if __name__ == "__main__":
    main("encoder")
