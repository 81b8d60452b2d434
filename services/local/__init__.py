"""The local launcher behind `splitserve up`: pods and router as a process group."""
