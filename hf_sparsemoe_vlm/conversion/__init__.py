"""What the conversion scripts in `conversion/` use: upcycling dense checkpoints into sparse ones, the shared
command-line options, checks and the summary of a converted checkpoint (`upcycling`)."""
