from dropstudy.cli import main

main()
