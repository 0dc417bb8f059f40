package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

// bashCompletion asks skybridge itself for the candidates at the cursor
// (urfave/cli answers --generate-bash-completion), so completion always
// matches the binary's commands and flags.
const bashCompletion = `# skybridge bash completion: source <(skybridge completion bash)
_skybridge_complete() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  local words=("${COMP_WORDS[@]:0:COMP_CWORD}")
  [[ $cur == -* ]] && words+=("$cur")
  COMPREPLY=($(compgen -W "$("${words[@]}" --generate-bash-completion 2>/dev/null)" -- "$cur"))
}
complete -o default -F _skybridge_complete skybridge
`

func completionCommand() *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print a shell completion script",
		ArgsUsage: "SHELL",
		UsageText: "source <(skybridge completion bash)",
		Action: func(c *cli.Context) error {
			switch sh := c.Args().First(); sh {
			case "bash", "":
				_, err := fmt.Fprint(c.App.Writer, bashCompletion)
				return err
			default:
				return usageError("no completion for shell %q; only bash is supported", sh)
			}
		},
	}
}
