-- Rotates through pre-signed DR webhook requests (one per line: signature TAB body),
-- so every request carries its own event id and a valid signature.
local requests = {}
local index = 0

function init(args)
  for line in io.lines(args[1]) do
    local signature, body = line:match("^([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", "/webhooks/digital-river", {
      ["Content-Type"] = "application/json",
      ["DigitalRiver-Signature"] = signature,
    }, body)
  end
  index = math.random(#requests)
end

function request()
  index = index % #requests + 1
  return requests[index]
end
