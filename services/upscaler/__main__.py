"""python -m services.upscaler [--port P]: run the upscaler service."""

from videomesh.launch import main

if __name__ == "__main__":
    main("upscaler")
