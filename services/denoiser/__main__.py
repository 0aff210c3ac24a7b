"""python -m services.denoiser [--port P] [--model NAME]: run the denoiser service."""

from videomesh.launch import main

if __name__ == "__main__":
    main("denoiser")
